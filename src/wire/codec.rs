//! The bounded payload codec: [`Enc`] writes, [`Dec`] reads and checks every length against
//! what is left before it reads. It depends on nothing else in `wire`, so `manifest` can use it
//! while `wire::hello` carries a `Manifest`.

use crate::error::WireError;

/// The longest string field (a path, a message, an address).
pub const MAX_STR: usize = 4096;

/// A payload encoder.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a little-endian u128.
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a string: u32 length, then its UTF-8 bytes (truncated to [`MAX_STR`] bytes at a
    /// character boundary, so that what is encoded always decodes).
    pub fn str(&mut self, s: &str) -> &mut Self {
        let mut end = s.len().min(MAX_STR);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u32(end as u32);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
        self
    }
}

/// A payload decoder over a byte slice.
#[derive(Debug)]
pub struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// Reads a byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    /// Reads a little-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4")))
    }
    /// Reads a little-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8")))
    }
    /// Reads a little-endian u128.
    pub fn u128(&mut self, what: &'static str) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.take(16, what)?.try_into().expect("16")))
    }
    /// Reads a string of at most [`MAX_STR`] bytes.
    pub fn str(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32(what)? as usize;
        if len > MAX_STR {
            return Err(WireError::Invalid(format!("{what}: {len} bytes is too long")));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid(format!("{what}: not UTF-8")))
    }
    /// Reads a count and checks that at least `count * min_item` bytes remain, so that a
    /// hostile count cannot make the caller allocate more than the frame holds.
    pub fn count(&mut self, what: &'static str, min_item: usize) -> Result<usize, WireError> {
        let n = self.u64(what)?;
        let need = n.checked_mul(min_item as u64).ok_or(WireError::Truncated(what))?;
        if need > self.buf.len() as u64 {
            return Err(WireError::Truncated(what));
        }
        Ok(n as usize)
    }
    /// Checks that nothing is left over.
    pub fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Invalid(format!("{} trailing bytes after {what}", self.buf.len())))
        }
    }
}
