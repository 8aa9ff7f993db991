//! The version exchange (RFC 4253 section 4.2): finding the peer's version
//! line, with bounds on what a client skips before it.

use bytes::Buf;

use super::Transport;
use crate::error::{Error, Result};

/// Bytes a client skips before the server's version line (RFC 4253 section 4.2
/// allows other lines first; link noise may precede it too).
const MAX_PRE_VERSION_BYTES: usize = 64 * 1024;
/// Lines a client skips before the server's version line.
const MAX_PRE_VERSION_LINES: usize = 1024;
/// Longest version line, CR LF included (RFC 4253 section 4.2).
const MAX_VERSION_LINE: usize = 255;

impl Transport {
    fn skip(&mut self, n: usize) -> Result<()> {
        self.skipped_lines += self.inbuf[..n].iter().filter(|&&b| b == b'\n').count();
        self.skipped_bytes += n;
        self.inbuf.advance(n);
        if self.skipped_bytes > MAX_PRE_VERSION_BYTES || self.skipped_lines > MAX_PRE_VERSION_LINES
        {
            return Err(Error::Version(
                "no SSH-2.0 version line within 64 KiB or 1024 lines",
            ));
        }
        Ok(())
    }

    /// Finds the peer's version line. A client skips anything before it; a server
    /// requires it first.
    pub(super) fn read_version(&mut self) -> Result<bool> {
        const PREFIXES: [&[u8]; 2] = [b"SSH-2.0-", b"SSH-1.99-"];
        loop {
            let found = self.inbuf.windows(4).position(|w| w == b"SSH-");
            let Some(at) = found else {
                if !self.is_client()
                    && !self.inbuf.is_empty()
                    && !b"SSH-".starts_with(&self.inbuf[..self.inbuf.len().min(4)])
                {
                    return Err(Error::Version(
                        "the client did not start with an SSH version line",
                    ));
                }
                let keep = self.inbuf.len().min(3);
                self.skip(self.inbuf.len() - keep)?;
                return Ok(false);
            };
            if at > 0 {
                if !self.is_client() {
                    return Err(Error::Version(
                        "the client did not start with an SSH version line",
                    ));
                }
                self.skip(at)?;
            }
            // `inbuf` now starts with "SSH-".
            let head = &self.inbuf[..self.inbuf.len().min(9)];
            if !PREFIXES.iter().any(|p| head.starts_with(p)) {
                if PREFIXES.iter().any(|p| p.starts_with(head)) {
                    return Ok(false);
                }
                if !self.is_client() {
                    return Err(Error::Version("the peer does not speak SSH 2.0"));
                }
                self.skip(4)?;
                continue;
            }
            let Some(nl) = self.inbuf.iter().position(|&b| b == b'\n') else {
                if self.inbuf.len() > MAX_VERSION_LINE {
                    return Err(Error::Version("version line longer than 255 bytes"));
                }
                return Ok(false);
            };
            if nl + 1 > MAX_VERSION_LINE {
                return Err(Error::Version("version line longer than 255 bytes"));
            }
            let mut line = &self.inbuf[..nl];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            self.peer_version = Some(line.to_vec());
            self.inbuf.advance(nl + 1);
            return Ok(true);
        }
    }
}
