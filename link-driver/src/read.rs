//! Reading a stream straight into one large buffer: each read is handed over
//! as its own `BytesMut`, and consecutive reads are contiguous, so a
//! connection joins them without a copy (a profile showed the copy into the
//! connection's input buffer costing more than decrypting it).

use std::io;
use std::os::fd::AsFd;

use async_io::Async;
use bytes::BytesMut;

/// Room for reads; a new buffer starts when less than [`MIN_READ`] is left.
const READ_BUFFER: usize = 1 << 20;
const MIN_READ: usize = 64 * 1024;

/// Reads land in the spare capacity of a shared buffer (no zero-fill).
pub struct ReadBuffer {
    buf: BytesMut,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        Self {
            buf: BytesMut::with_capacity(READ_BUFFER),
        }
    }
}

impl ReadBuffer {
    /// The next bytes from `stream`; empty at end of stream.
    pub async fn read<S: AsFd>(&mut self, stream: &Async<S>) -> io::Result<BytesMut> {
        self.read_at_most(stream, usize::MAX).await
    }

    /// The next bytes from `stream`, at most `max` of them (at least 1).
    pub async fn read_at_most<S: AsFd>(
        &mut self,
        stream: &Async<S>,
        max: usize,
    ) -> io::Result<BytesMut> {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            // The old allocation lives on in the chunks handed out.
            self.buf = BytesMut::with_capacity(READ_BUFFER);
        }
        let buf = &mut self.buf;
        let n = stream
            .read_with(|s| {
                let spare = buf.spare_capacity_mut();
                let want = max.clamp(1, spare.len());
                let (filled, _) =
                    rustix::io::read(s, &mut spare[..want]).map_err(io::Error::from)?;
                Ok(filled.len())
            })
            .await?;
        // SAFETY: `read` initialized the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Ok(self.buf.split())
    }
}
