//! Random names and identifiers for the kit (UIDs, container IDs).

/// `N` random bytes from getrandom(2).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: getrandom(2) into the unfilled tail of our own buffer.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        assert!(
            n > 0 || std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted,
            "getrandom: {}",
            std::io::Error::last_os_error()
        );
        filled += n.max(0) as usize;
    }
    buf
}

/// `2 * bytes` lowercase hex digits (a container ID: 32 bytes, 64 digits).
pub fn random_hex(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2);
    while out.len() < bytes * 2 {
        for b in random_bytes::<16>() {
            if out.len() < bytes * 2 {
                out.push_str(&format!("{b:02x}"));
            }
        }
    }
    out
}

/// A random version 4 UUID, the shape of `metadata.uid`.
pub fn random_uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(random_uuid(), u);
        assert_eq!(random_hex(32).len(), 64);
    }
}
