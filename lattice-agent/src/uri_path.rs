//! The request path in the form SigV4 signs it, as botocore (and the
//! service) computes it from the path forwarded: dot segments and empty
//! segments removed ([`normalized_path`]), then percent-encoded again
//! ([`canonical_path`]). The proxy forwards the path byte for byte; only
//! the signature sees these forms.

use std::borrow::Cow;

use crate::query;

/// The canonical path: [`normalized_path`], then every byte but
/// unreserved ones and `/` percent-encoded again (a `%` of the wire form
/// becomes `%25`).
pub fn canonical_path(path: &str) -> Cow<'_, str> {
    if is_canonical_path(path) {
        return Cow::Borrowed(path);
    }
    let normalized = normalized_path(path);
    let mut encoded = String::with_capacity(normalized.len());
    query::encode_into(normalized.as_bytes(), true, &mut encoded);
    Cow::Owned(encoded)
}

/// The path as botocore reads it before encoding (RFC 3986 dot-segment
/// removal, plus empty segments dropped): absolute; a trailing `/` is kept
/// only when the path ends with one and something is left, so `/a/b/` stays
/// `/a/b/` but `/a/.` is `/a` and `/a/..` is `/`.
pub fn normalized_path(path: &str) -> Cow<'_, str> {
    if is_normalized_path(path) {
        return Cow::Borrowed(path);
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normalized = String::with_capacity(path.len() + 1);
    for s in &segments {
        normalized.push('/');
        normalized.push_str(s);
    }
    if normalized.is_empty() || (path.ends_with('/') && !segments.is_empty()) {
        normalized.push('/');
    }
    Cow::Owned(normalized)
}

/// Whether [`normalized_path`] leaves `path` as it is: absolute, and no
/// empty, `.` or `..` segment (a trailing `/` is kept as is).
fn is_normalized_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let segments = rest.strip_suffix('/').unwrap_or(rest);
    segments
        .split('/')
        .all(|seg| !matches!(seg, "" | "." | ".."))
}

/// Whether `path` is its own canonical form (the usual case, checked
/// without allocating): normalized, and only unreserved bytes and `/`.
fn is_canonical_path(path: &str) -> bool {
    path.bytes().all(|b| b == b'/' || query::is_unreserved(b)) && is_normalized_path(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/"), "/");
        assert_eq!(canonical_path("/a/./b/../c"), "/a/c");
        assert_eq!(canonical_path("//a//b/"), "/a/b/");
        assert_eq!(canonical_path("/a%20b"), "/a%2520b");
        assert_eq!(canonical_path("/c:d@e"), "/c%3Ad%40e");
        // Already canonical: borrowed as is.
        for path in ["/", "/a/b", "/a/b/", "/.a/b..c/~x-y_z", "/index.json"] {
            assert!(
                matches!(canonical_path(path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
        assert_eq!(canonical_path("/a/."), "/a");
        assert_eq!(canonical_path("/a/.."), "/");
        assert_eq!(canonical_path("/a/../"), "/");
        assert_eq!(canonical_path("/a/b/."), "/a/b");
        assert_eq!(canonical_path("/a/b/.."), "/a");
        assert_eq!(canonical_path("/a/b/../"), "/a/");
        assert_eq!(canonical_path("/."), "/");
        assert_eq!(canonical_path("a/b"), "/a/b");
        assert_eq!(canonical_path("//"), "/");
    }
}
