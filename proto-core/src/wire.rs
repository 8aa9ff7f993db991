//! RFC 4251 data types: a reader over received payloads that hands out zero-copy
//! slices, and writer helpers for any `BufMut`.
//!
//! Written over `bytes` rather than with `ssh-encoding`: channel data must leave the
//! decrypted packet as a `Bytes` slice without a copy, and ssh-encoding 0.2 copies
//! every string and has no boolean. `ssh-encoding` is still used (through `ssh-key`)
//! for key files.

use bytes::{BufMut, Bytes};

use crate::error::Error;

/// Message numbers (RFC 4250 section 4.1, RFC 8308, draft mlkem hybrid kex).
pub mod msg {
    pub const DISCONNECT: u8 = 1;
    pub const IGNORE: u8 = 2;
    pub const UNIMPLEMENTED: u8 = 3;
    pub const DEBUG: u8 = 4;
    pub const SERVICE_REQUEST: u8 = 5;
    pub const SERVICE_ACCEPT: u8 = 6;
    pub const EXT_INFO: u8 = 7;
    pub const KEXINIT: u8 = 20;
    pub const NEWKEYS: u8 = 21;
    /// SSH_MSG_KEX_ECDH_INIT, also SSH_MSG_KEX_HYBRID_INIT.
    pub const KEX_INIT: u8 = 30;
    /// SSH_MSG_KEX_ECDH_REPLY, also SSH_MSG_KEX_HYBRID_REPLY.
    pub const KEX_REPLY: u8 = 31;
    pub const USERAUTH_REQUEST: u8 = 50;
    pub const USERAUTH_FAILURE: u8 = 51;
    pub const USERAUTH_SUCCESS: u8 = 52;
    pub const USERAUTH_BANNER: u8 = 53;
    pub const USERAUTH_PK_OK: u8 = 60;
    pub const GLOBAL_REQUEST: u8 = 80;
    pub const REQUEST_SUCCESS: u8 = 81;
    pub const REQUEST_FAILURE: u8 = 82;
    pub const CHANNEL_OPEN: u8 = 90;
    pub const CHANNEL_OPEN_CONFIRMATION: u8 = 91;
    pub const CHANNEL_OPEN_FAILURE: u8 = 92;
    pub const CHANNEL_WINDOW_ADJUST: u8 = 93;
    pub const CHANNEL_DATA: u8 = 94;
    pub const CHANNEL_EXTENDED_DATA: u8 = 95;
    pub const CHANNEL_EOF: u8 = 96;
    pub const CHANNEL_CLOSE: u8 = 97;
    pub const CHANNEL_REQUEST: u8 = 98;
    pub const CHANNEL_SUCCESS: u8 = 99;
    pub const CHANNEL_FAILURE: u8 = 100;

    /// A short name for logs and errors.
    pub fn name(n: u8) -> &'static str {
        match n {
            DISCONNECT => "DISCONNECT",
            IGNORE => "IGNORE",
            UNIMPLEMENTED => "UNIMPLEMENTED",
            DEBUG => "DEBUG",
            SERVICE_REQUEST => "SERVICE_REQUEST",
            SERVICE_ACCEPT => "SERVICE_ACCEPT",
            EXT_INFO => "EXT_INFO",
            KEXINIT => "KEXINIT",
            NEWKEYS => "NEWKEYS",
            KEX_INIT => "KEX_ECDH_INIT",
            KEX_REPLY => "KEX_ECDH_REPLY",
            USERAUTH_REQUEST => "USERAUTH_REQUEST",
            USERAUTH_FAILURE => "USERAUTH_FAILURE",
            USERAUTH_SUCCESS => "USERAUTH_SUCCESS",
            USERAUTH_BANNER => "USERAUTH_BANNER",
            USERAUTH_PK_OK => "USERAUTH_PK_OK",
            GLOBAL_REQUEST => "GLOBAL_REQUEST",
            REQUEST_SUCCESS => "REQUEST_SUCCESS",
            REQUEST_FAILURE => "REQUEST_FAILURE",
            CHANNEL_OPEN => "CHANNEL_OPEN",
            CHANNEL_OPEN_CONFIRMATION => "CHANNEL_OPEN_CONFIRMATION",
            CHANNEL_OPEN_FAILURE => "CHANNEL_OPEN_FAILURE",
            CHANNEL_WINDOW_ADJUST => "CHANNEL_WINDOW_ADJUST",
            CHANNEL_DATA => "CHANNEL_DATA",
            CHANNEL_EXTENDED_DATA => "CHANNEL_EXTENDED_DATA",
            CHANNEL_EOF => "CHANNEL_EOF",
            CHANNEL_CLOSE => "CHANNEL_CLOSE",
            CHANNEL_REQUEST => "CHANNEL_REQUEST",
            CHANNEL_SUCCESS => "CHANNEL_SUCCESS",
            CHANNEL_FAILURE => "CHANNEL_FAILURE",
            _ => "unknown",
        }
    }
}

/// A cursor over a payload. Strings are returned as borrowed slices, or as `Bytes`
/// sharing the payload's allocation when the reader was made from `Bytes`.
#[derive(Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
    owner: Option<&'a Bytes>,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `data`; `what` names the message in errors.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Self {
            data,
            owner: None,
            what,
        }
    }

    /// A reader whose `bytes()` slices share `payload`'s allocation.
    pub fn from_bytes(payload: &'a Bytes, what: &'static str) -> Self {
        Self {
            data: payload,
            owner: Some(payload),
            what,
        }
    }

    fn malformed(&self, what: &'static str) -> Error {
        Error::Malformed {
            msg: self.what,
            what,
        }
    }

    /// The message being read (for errors).
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    /// `byte[n]`.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.data.len() < n {
            return Err(self.malformed("truncated"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    /// `byte`.
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    /// `boolean`: any non-zero byte is TRUE (RFC 4251 section 5).
    pub fn bool(&mut self) -> Result<bool, Error> {
        Ok(self.u8()? != 0)
    }

    /// `uint32`.
    pub fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `uint64`.
    pub fn u64(&mut self) -> Result<u64, Error> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// `string` as a borrowed slice.
    pub fn string(&mut self) -> Result<&'a [u8], Error> {
        let len = self.u32()? as usize;
        if len > self.data.len() {
            return Err(self.malformed("string longer than the message"));
        }
        self.take(len)
    }

    /// `string` as `Bytes`, sharing the payload when possible.
    pub fn bytes(&mut self) -> Result<Bytes, Error> {
        let s = self.string()?;
        Ok(match self.owner {
            Some(owner) => owner.slice_ref(s),
            None => Bytes::copy_from_slice(s),
        })
    }

    /// `string` that must be UTF-8.
    pub fn utf8(&mut self) -> Result<&'a str, Error> {
        let s = self.string()?;
        core::str::from_utf8(s).map_err(|_| self.malformed("string is not UTF-8"))
    }

    /// `name-list`: a comma-separated list of ASCII names.
    pub fn name_list(&mut self) -> Result<Vec<&'a str>, Error> {
        let s = self.string()?;
        if !s.is_ascii() {
            return Err(self.malformed("name-list is not ASCII"));
        }
        let s = core::str::from_utf8(s).map_err(|_| self.malformed("name-list"))?;
        if s.is_empty() {
            return Ok(Vec::new());
        }
        Ok(s.split(',').collect())
    }

    /// The rest of the payload.
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.data)
    }

    /// The rest of the payload as `Bytes`.
    pub fn rest_bytes(&mut self) -> Bytes {
        let s = self.rest();
        match self.owner {
            Some(owner) => owner.slice_ref(s),
            None => Bytes::copy_from_slice(s),
        }
    }
}

/// Writers for the RFC 4251 types, on anything that is `BufMut`.
pub trait PutSsh: BufMut {
    /// `string`.
    fn put_string(&mut self, s: &[u8]) {
        self.put_u32(s.len() as u32);
        self.put_slice(s);
    }

    /// `boolean`.
    fn put_bool(&mut self, b: bool) {
        self.put_u8(b as u8);
    }

    /// `name-list`.
    fn put_name_list<S: AsRef<str>>(&mut self, names: &[S]) {
        let len: usize =
            names.iter().map(|n| n.as_ref().len()).sum::<usize>() + names.len().saturating_sub(1);
        self.put_u32(len as u32);
        for (i, n) in names.iter().enumerate() {
            if i > 0 {
                self.put_u8(b',');
            }
            self.put_slice(n.as_ref().as_bytes());
        }
    }

    /// `mpint` from an unsigned big-endian magnitude.
    fn put_mpint(&mut self, magnitude: &[u8]) {
        let start = magnitude
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(magnitude.len());
        let m = &magnitude[start..];
        let pad = m.first().is_some_and(|&b| b & 0x80 != 0);
        self.put_u32((m.len() + pad as usize) as u32);
        if pad {
            self.put_u8(0);
        }
        self.put_slice(m);
    }
}

impl<B: BufMut + ?Sized> PutSsh for B {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpint_encoding_follows_rfc4251_examples() {
        let enc = |m: &[u8]| {
            let mut v = Vec::new();
            v.put_mpint(m);
            v
        };
        assert_eq!(enc(&[0, 0]), [0, 0, 0, 0]);
        assert_eq!(enc(&[0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7]), {
            let mut e = vec![0, 0, 0, 8];
            e.extend_from_slice(&[0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7]);
            e
        });
        assert_eq!(enc(&[0x80]), [0, 0, 0, 2, 0, 0x80]);
    }

    #[test]
    fn name_list_round_trips_and_empty_list_is_empty() {
        let mut v = Vec::new();
        v.put_name_list(&["zlib", "none"]);
        v.put_name_list::<&str>(&[]);
        let mut r = Reader::new(&v, "test");
        assert_eq!(r.name_list().unwrap(), ["zlib", "none"]);
        assert!(r.name_list().unwrap().is_empty());
    }

    #[test]
    fn truncated_string_is_an_error_not_a_panic() {
        let mut r = Reader::new(&[0, 0, 0, 9, 1, 2], "test");
        assert!(matches!(r.string(), Err(Error::Malformed { .. })));
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff], "test");
        assert!(r.string().is_err());
    }

    #[test]
    fn bytes_share_the_payload_allocation() {
        let payload = Bytes::from_static(&[0, 0, 0, 3, b'a', b'b', b'c']);
        let mut r = Reader::from_bytes(&payload, "test");
        let s = r.bytes().unwrap();
        assert_eq!(&s[..], b"abc");
        assert_eq!(s.as_ptr(), payload[4..].as_ptr());
    }
}
