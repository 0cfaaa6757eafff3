//! The request query, in the two forms the proxy needs.
//!
//! - [`wire_query`]: what goes upstream. The app's pairs in the app's order;
//!   a pair is rewritten only where its encoding is ambiguous to a SigV4
//!   verifier. Order is data (repeated keys carry lists), and the server
//!   sorts again when it verifies, so the signature does not depend on it.
//! - [`canonical_query`]: the SigV4 canonical query string (sorted), which
//!   aws-sigv4 computes itself when signing; here only for `--log-signing`.
//!
//! Why pairs must be normalised: a verifier either decodes each name and
//! value and encodes it again (AWS's documented algorithm, aws-sigv4) or
//! takes the pairs as they arrived and only sorts them (botocore). Both
//! agree, and agree with our signature, exactly when every pair on the wire
//! is already in canonical encoding: unreserved bytes (`A-Za-z0-9-_.~`)
//! literal, every other byte `%XX` with uppercase hex. So a pair containing
//! `+` (a space in form encoding, but a literal `+` to a verifier that takes
//! it as sent), a raw byte outside the unreserved set, lowercase hex, or an
//! escaped unreserved byte (`%7e`) is re-encoded; every other pair is kept
//! byte for byte. Empty segments (`a=1&&b=2`, a trailing `&`) carry no pair
//! and are dropped: verifiers disagree on them (an empty pair, or nothing).

use std::borrow::Cow;

/// A query the proxy cannot sign so that every verifier agrees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// aws-sigv4 decodes names and values as UTF-8 (lossily): a
    /// percent-encoded byte sequence that is not UTF-8 would be signed as
    /// U+FFFD and fail verification.
    #[error("query parameter {pair:?} is percent-encoded bytes that are not UTF-8")]
    NotUtf8 { pair: String },
}

/// The query to forward: the app's pairs in the app's order, each kept as
/// sent unless its encoding is ambiguous (see the module docs). Borrows
/// `raw` when nothing changes.
pub fn wire_query(raw: &str) -> Result<Cow<'_, str>, QueryError> {
    let mut changed = false;
    let mut pairs: Vec<Cow<'_, str>> = Vec::new();
    for segment in raw.split('&') {
        if segment.is_empty() {
            changed = true;
            continue;
        }
        let pair = normalise_pair(segment)?;
        changed |= matches!(pair, Cow::Owned(_));
        pairs.push(pair);
    }
    if !changed {
        return Ok(Cow::Borrowed(raw));
    }
    Ok(Cow::Owned(pairs.join("&")))
}

/// The SigV4 canonical query string of `raw`: every pair normalised, a
/// name without `=` given an empty value, pairs sorted by name, then value.
pub fn canonical_query(raw: &str) -> Result<String, QueryError> {
    let wire = wire_query(raw)?;
    let mut pairs: Vec<(&str, &str)> = wire
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort_unstable();
    let mut out = String::with_capacity(wire.len() + pairs.len());
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    Ok(out)
}

/// One `name[=value]` segment, borrowed when already canonical.
fn normalise_pair(segment: &str) -> Result<Cow<'_, str>, QueryError> {
    let (name, value) = match segment.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (segment, None),
    };
    let not_utf8 = || QueryError::NotUtf8 {
        pair: segment.to_owned(),
    };
    let name_ok = is_canonical(name.as_bytes()).ok_or_else(not_utf8)?;
    let value_ok = match value {
        Some(v) => is_canonical(v.as_bytes()).ok_or_else(not_utf8)?,
        None => true,
    };
    if name_ok && value_ok {
        return Ok(Cow::Borrowed(segment));
    }
    // The same shape as sent: a bare name stays bare.
    let mut out = String::with_capacity(segment.len() + 8);
    encode_into(&decode(name.as_bytes()), false, &mut out);
    if let Some(v) = value {
        out.push('=');
        encode_into(&decode(v.as_bytes()), false, &mut out);
    }
    Ok(Cow::Owned(out))
}

/// `Some(true)`: canonical as is; `Some(false)`: needs re-encoding;
/// `None`: its decoded bytes are not UTF-8.
fn is_canonical(component: &[u8]) -> Option<bool> {
    let mut canonical = true;
    let mut high_bytes = false;
    let mut i = 0;
    while i < component.len() {
        let b = component[i];
        if b == b'%'
            && let Some(decoded) = hex_pair(component, i + 1)
        {
            let upper = component[i + 1..i + 3]
                .iter()
                .all(|h| !h.is_ascii_lowercase());
            canonical &= upper && !is_unreserved(decoded);
            high_bytes |= decoded >= 0x80;
            i += 3;
            continue;
        }
        canonical &= is_unreserved(b);
        high_bytes |= b >= 0x80;
        i += 1;
    }
    if high_bytes && std::str::from_utf8(&decode(component)).is_err() {
        return None;
    }
    Some(canonical)
}

/// Percent-decoding as form encoding does: `+` is a space, a `%` not
/// followed by two hex digits is a literal `%`.
fn decode(component: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(component.len());
    let mut i = 0;
    while i < component.len() {
        match component[i] {
            b'%' if hex_pair(component, i + 1).is_some() => {
                out.extend(hex_pair(component, i + 1));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// SigV4 URI encoding: unreserved bytes stay, every other byte becomes
/// `%XX` (uppercase hex); `/` stays too when `keep_slash` (paths).
pub(crate) fn encode_into(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

fn hex_pair(bytes: &[u8], at: usize) -> Option<u8> {
    let digit = |b: u8| char::from(b).to_digit(16);
    let hi = digit(*bytes.get(at)?)?;
    let lo = digit(*bytes.get(at + 1)?)?;
    u8::try_from(hi * 16 + lo).ok()
}

pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(raw: &str) -> String {
        wire_query(raw).unwrap().into_owned()
    }

    #[test]
    fn order_of_pairs_and_repeated_values_is_kept() {
        for raw in ["tag=z&tag=y&tag=x", "b=2&a=1&a=0", "z=1&y=%2F"] {
            assert!(matches!(wire_query(raw), Ok(Cow::Borrowed(_))), "{raw}");
        }
        assert_eq!(wire("z=1&y=%2F&x=a+b"), "z=1&y=%2F&x=a%20b");
    }

    #[test]
    fn only_ambiguous_pairs_are_rewritten() {
        // `+` is a space; `%2B` a literal plus and already canonical.
        assert_eq!(wire("p=%2B&s=+&t=a+b"), "p=%2B&s=%20&t=a%20b");
        // Lowercase hex, escaped unreserved bytes, raw reserved bytes.
        assert_eq!(wire("k=%2f&u=%7e%41&b=[1]"), "k=%2F&u=~A&b=%5B1%5D");
        assert_eq!(wire("q=it's(1)*!"), "q=it%27s%281%29%2A%21");
        // A second `=` belongs to the value.
        assert_eq!(wire("f=name=x"), "f=name%3Dx");
        // Non-ASCII UTF-8 sent raw, and a stray `%`.
        assert_eq!(wire("c=caf\u{e9}&p=100%"), "c=caf%C3%A9&p=100%25");
        // Percent-encoded UTF-8 with uppercase hex is canonical.
        assert_eq!(wire("u=%E2%82%AC"), "u=%E2%82%AC");
    }

    #[test]
    fn bare_names_and_empty_values_keep_their_shape() {
        assert_eq!(wire("flag&a=&=x"), "flag&a=&=x");
        assert_eq!(wire("a+b&c"), "a%20b&c");
        assert_eq!(canonical_query("flag&a=&=x").unwrap(), "=x&a=&flag=");
    }

    #[test]
    fn empty_segments_are_dropped() {
        assert_eq!(wire("a=1&&b=2&"), "a=1&b=2");
        assert_eq!(wire("&"), "");
    }

    #[test]
    fn percent_encoded_non_utf8_is_refused() {
        let err = wire_query("a=1&k=%FF").unwrap_err();
        assert_eq!(
            err,
            QueryError::NotUtf8 {
                pair: "k=%FF".into()
            }
        );
        assert!(wire_query("%C3=1").is_err());
    }

    #[test]
    fn canonical_form_is_sorted_and_idempotent() {
        assert_eq!(
            canonical_query("tag=z&tag=y&b=2&a=1&a=0").unwrap(),
            "a=0&a=1&b=2&tag=y&tag=z"
        );
        for raw in ["", "a", "b=1&a=2", "k=%2f%3A", "x=a+b%20c", "%E2%82%AC=1"] {
            let once = canonical_query(raw).unwrap();
            assert_eq!(canonical_query(&once).unwrap(), once, "{raw}");
        }
    }

    /// The wire form is a permutation-preserving rewrite: its canonical
    /// query equals the one of the raw query (the signature is unchanged).
    #[test]
    fn wire_form_has_the_same_canonical_query() {
        for raw in [
            "z=1&y=%2F&x=a+b",
            "tag=z&tag=y&tag=x",
            "q=it's&q=%7e&flag&&a=b=c",
        ] {
            assert_eq!(
                canonical_query(&wire(raw)).unwrap(),
                canonical_query(raw).unwrap(),
                "{raw}"
            );
        }
    }
}
