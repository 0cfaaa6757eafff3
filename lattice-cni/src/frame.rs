//! Framing shared by the node agent's two Unix-socket protocols (the CNI
//! plugin's, [`crate::protocol`], and the agents' socket handover): one
//! JSON message per line, with descriptors alongside (SCM_RIGHTS).
//!
//! Every frame is capped. A line longer than its cap is refused as soon as
//! that many bytes of it have arrived, so a peer that never ends a line
//! (or sends a huge one) costs at most the cap plus one read, never more;
//! so are more descriptors with one message than it may carry, and
//! descriptors the kernel had to drop for want of room.

use std::{
    io::{self, IoSliceMut},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// Most descriptors one `sendmsg` may pass (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;
/// Bytes asked for per read.
const READ_SIZE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message longer than {max} bytes")]
    TooLong { max: usize },
    #[error("more than {max} descriptors sent with one message")]
    TooManyFds { max: usize },
    #[error("descriptors sent with the message were cut off by the kernel")]
    FdsTruncated,
    #[error("closed before a whole message")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => e,
            FrameError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// A stream's bytes cut into lines, holding at most `max_line` bytes of a
/// line not yet ended (the pure half of [`read_frame`]).
#[derive(Debug)]
pub struct Lines {
    /// Bytes received and not yet taken: whole lines, then the start of
    /// an unfinished one.
    pending: Vec<u8>,
    /// Length of the unfinished line at the end of `pending`.
    partial: usize,
    max_line: usize,
}

impl Lines {
    pub fn new(max_line: usize) -> Self {
        Self {
            pending: Vec::new(),
            partial: 0,
            max_line,
        }
    }

    /// The cap: the longest line accepted, without its `\n`.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Bytes held.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Takes bytes read from the stream. A line that would grow past the
    /// cap is refused, and nothing of `bytes` is kept then.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        let mut partial = self.partial;
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let ended = piece.last() == Some(&b'\n');
            let len = partial + piece.len() - usize::from(ended);
            if len > self.max_line {
                return Err(FrameError::TooLong { max: self.max_line });
            }
            partial = if ended { 0 } else { len };
        }
        self.pending.extend_from_slice(bytes);
        self.partial = partial;
        Ok(())
    }

    /// The next whole line, without its `\n`.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        let end = self.pending.iter().position(|b| *b == b'\n')?;
        let mut line: Vec<u8> = self.pending.drain(..=end).collect();
        line.pop();
        Some(line)
    }
}

/// The next line of `stream` (read into `lines` until one is whole), and
/// every descriptor that arrived meanwhile, at most `max_fds`. The
/// stream's read timeout bounds each wait.
pub fn read_frame(
    stream: &UnixStream,
    lines: &mut Lines,
    max_fds: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        if let Some(line) = lines.next_line() {
            return Ok((line, fds));
        }
        let mut buf = [0u8; READ_SIZE];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        // Owned at once, so they are closed on any error below.
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process: nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(FrameError::FdsTruncated);
        }
        if fds.len() > max_fds {
            return Err(FrameError::TooManyFds { max: max_fds });
        }
        if n == 0 {
            return Err(FrameError::Closed);
        }
        lines.push(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn lines_of(max: usize, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut lines = Lines::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            lines.push(chunk)?;
            while let Some(line) = lines.next_line() {
                out.push(line);
            }
        }
        Ok(out)
    }

    #[test]
    fn lines_whatever_the_chunks() {
        let want = vec![b"ab".to_vec(), b"".to_vec(), b"cde".to_vec()];
        for chunks in [
            &[&b"ab\n\ncde\n"[..]][..],
            &[b"a", b"b\n", b"\nc", b"de", b"\n"],
            &[b"ab\n\n", b"cde\nf"],
        ] {
            assert_eq!(lines_of(3, chunks).unwrap(), want, "{chunks:?}");
        }
    }

    #[test]
    fn a_line_past_the_cap_is_refused_as_it_arrives() {
        // Exactly the cap is fine, one more byte is not, ended or not.
        assert!(lines_of(4, &[b"abcd\n"]).is_ok());
        for chunks in [&[&b"abcde\n"[..]][..], &[b"abc", b"de"], &[b"ok\nabcde"]] {
            assert!(
                matches!(lines_of(4, chunks), Err(FrameError::TooLong { max: 4 })),
                "{chunks:?}"
            );
        }
        let mut lines = Lines::new(4);
        lines.push(b"abcd").unwrap();
        assert!(lines.push(b"e").is_err());
        assert_eq!(lines.buffered(), 4, "the refused bytes are not kept");
    }

    /// A peer that writes without ever ending a line is cut off after the
    /// cap, with what it sent so far not buffered beyond it.
    #[test]
    fn an_endless_line_is_refused_not_buffered() {
        let (reader, writer) = UnixStream::pair().unwrap();
        let feeder = std::thread::spawn(move || {
            let chunk = [b'x'; 4096];
            let mut sent = 0usize;
            // Until the reader gives up (EPIPE), at most 64 MiB.
            while sent < 64 << 20 {
                match (&writer).write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            sent
        });
        let mut lines = Lines::new(64 * 1024);
        let err = read_frame(&reader, &mut lines, 0).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { max: 65536 }), "{err}");
        assert!(lines.buffered() <= 64 * 1024);
        drop(reader);
        let sent = feeder.join().unwrap();
        assert!(sent < 64 << 20, "the reader kept reading: {sent} bytes");
    }

    #[test]
    fn descriptors_beyond_the_limit_are_refused() {
        let (reader, writer) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        nix::sys::socket::sendmsg::<()>(
            writer.as_raw_fd(),
            &[std::io::IoSlice::new(b"{}\n")],
            &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let err = read_frame(&reader, &mut Lines::new(64), 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "more than 2 descriptors sent with one message"
        );
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::InvalidData);
    }
}
