//! Ceph's `denc` wire encoding, the small part of it the journal needs:
//! little-endian integers, `u32`-length-prefixed strings and bufferlists,
//! `u32`-counted lists and maps, `u8`-flagged optionals, and versioned
//! structs (`ENCODE_START(v, compat)`: `u8 v, u8 compat, u32 len, body`).
//!
//! The decoder reads from a borrowed slice and never panics on hostile
//! input: every length is checked against the bytes that are left before
//! anything is sliced, and a count is checked against the smallest size its
//! items can have before anything is allocated, so a length field of 4 GiB
//! costs nothing. Versioned structs are decoded inside their declared
//! length; an unknown tail a newer encoder appended is skipped, as Ceph's
//! `DECODE_FINISH` does.

/// Why bytes could not be decoded. Every variant names what was being
/// decoded, so that an error in a journal entry points at the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before the field does.
    #[error("{what}: needs {need} bytes at offset {at}, {have} left")]
    Truncated {
        /// The field.
        what: &'static str,
        /// Offset of the field in the buffer being decoded.
        at: usize,
        /// Bytes the field needs (from its type or its length prefix).
        need: u64,
        /// Bytes left in the buffer.
        have: usize,
    },
    /// A versioned struct whose compat version is newer than this decoder.
    #[error("{what}: encoded as version {version} compat {compat}, decoder knows up to {known}")]
    Incompatible {
        /// The struct.
        what: &'static str,
        /// Its encoded version.
        version: u8,
        /// The oldest decoder version that can read it.
        compat: u8,
        /// The newest version this decoder reads.
        known: u8,
    },
    /// A field holds a value the format does not allow.
    #[error("{what}: invalid value {value}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// A string field that is not UTF-8.
    #[error("{what}: not UTF-8")]
    Utf8 {
        /// The field.
        what: &'static str,
    },
    /// Bytes left over after a value that must fill its buffer.
    #[error("{what}: {extra} bytes left over")]
    Trailing {
        /// The value.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
}

/// Result of a decode.
pub type DecodeResult<T> = Result<T, DecodeError>;

/// A cursor over a borrowed buffer.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not decoded yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Offset of the next byte in the buffer.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Fails with [`DecodeError::Trailing`] unless everything was decoded.
    pub fn finish(&self, what: &'static str) -> DecodeResult<()> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { what, extra }),
        }
    }

    /// The next `n` bytes, borrowed.
    pub fn take(&mut self, n: u64, what: &'static str) -> DecodeResult<&'a [u8]> {
        let have = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= have => {
                let s = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(DecodeError::Truncated {
                what,
                at: self.pos,
                need: n,
                have,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> DecodeResult<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A `u8`.
    pub fn u8(&mut self, what: &'static str) -> DecodeResult<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> DecodeResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A little-endian `i32`.
    pub fn i32(&mut self, what: &'static str) -> DecodeResult<i32> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> DecodeResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A little-endian `i64`.
    pub fn i64(&mut self, what: &'static str) -> DecodeResult<i64> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    /// A `bool` (one byte; Ceph reads any non-zero byte as true).
    pub fn bool(&mut self, what: &'static str) -> DecodeResult<bool> {
        Ok(self.u8(what)? != 0)
    }

    /// A bufferlist: `u32` length, then the bytes (borrowed).
    pub fn bytes(&mut self, what: &'static str) -> DecodeResult<&'a [u8]> {
        let n = self.u32(what)?;
        self.take(u64::from(n), what)
    }

    /// A string: like [`Decoder::bytes`], and UTF-8.
    pub fn string(&mut self, what: &'static str) -> DecodeResult<String> {
        let b = self.bytes(what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8 { what })
    }

    /// An element count of a list, set or map whose items take at least
    /// `min_item` bytes each: refused when the rest of the buffer cannot
    /// hold that many, so that a hostile count allocates nothing.
    pub fn count(&mut self, min_item: usize, what: &'static str) -> DecodeResult<usize> {
        let at = self.pos;
        let n = self.u32(what)?;
        let need = u64::from(n) * min_item.max(1) as u64;
        if need > self.remaining() as u64 {
            return Err(DecodeError::Truncated {
                what,
                at,
                need,
                have: self.remaining(),
            });
        }
        Ok(n as usize)
    }

    /// A list of items that take at least `min_item` bytes each.
    pub fn list<T>(
        &mut self,
        min_item: usize,
        what: &'static str,
        mut item: impl FnMut(&mut Self) -> DecodeResult<T>,
    ) -> DecodeResult<Vec<T>> {
        let n = self.count(min_item, what)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    /// A `std::map<u64, u64>` (or `snapid_t` keys/values), in encoded order.
    pub fn map_u64_u64(&mut self, what: &'static str) -> DecodeResult<Vec<(u64, u64)>> {
        self.list(16, what, |d| Ok((d.u64(what)?, d.u64(what)?)))
    }

    /// A `boost::optional<u64>` / `std::optional<u64>`: `u8` flag, value.
    pub fn opt_u64(&mut self, what: &'static str) -> DecodeResult<Option<u64>> {
        Ok(if self.bool(what)? {
            Some(self.u64(what)?)
        } else {
            None
        })
    }

    /// A versioned struct: `u8 version, u8 compat, u32 len`, then `body`
    /// decodes the struct from exactly `len` bytes, given the version. Bytes
    /// `body` leaves are skipped (a newer encoder's tail). Refused when
    /// `compat` is newer than `known`, the newest version this code reads.
    pub fn versioned<T>(
        &mut self,
        known: u8,
        what: &'static str,
        body: impl FnOnce(&mut Decoder<'a>, u8) -> DecodeResult<T>,
    ) -> DecodeResult<T> {
        let version = self.u8(what)?;
        let compat = self.u8(what)?;
        if compat > known {
            return Err(DecodeError::Incompatible {
                what,
                version,
                compat,
                known,
            });
        }
        let len = self.u32(what)?;
        let at = self.pos;
        let inner = self.take(u64::from(len), what)?;
        let mut d = Decoder {
            buf: &self.buf[..at + inner.len()],
            pos: at,
        };
        body(&mut d, version)
    }
}

/// Builds Ceph-encoded bytes: the mirror image of [`Decoder`].
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes encoded.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `i64`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a `bool` as one byte.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Appends raw bytes with no length.
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends a count or length prefix.
    ///
    /// # Panics
    /// When `n` does not fit in a `u32`: Ceph cannot encode such a value,
    /// and nothing this crate encodes comes near it.
    pub fn len(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).expect("a Ceph length fits in u32"))
    }

    /// Appends a bufferlist (`u32` length, bytes).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.len(b.len()).raw(b)
    }

    /// Appends a string (`u32` length, bytes).
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends an optional `u64`.
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.bool(true).u64(v),
            None => self.bool(false),
        }
    }

    /// Appends a `map<u64, u64>`.
    pub fn map_u64_u64(&mut self, m: &[(u64, u64)]) -> &mut Self {
        self.len(m.len());
        for &(k, v) in m {
            self.u64(k).u64(v);
        }
        self
    }

    /// Appends a versioned struct whose body `body` encodes.
    pub fn versioned(
        &mut self,
        version: u8,
        compat: u8,
        body: impl FnOnce(&mut Self),
    ) -> &mut Self {
        self.u8(version).u8(compat);
        let at = self.buf.len();
        self.u32(0);
        body(self);
        let len = self.buf.len() - at - 4;
        let len = u32::try_from(len).expect("a Ceph struct fits in u32");
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_little_endian() {
        let mut e = Encoder::new();
        e.u8(1).u32(0x0203_0405).u64(7).i32(-2).bool(true);
        let b = e.into_bytes();
        assert_eq!(&b[..5], &[1, 5, 4, 3, 2]);
        let mut d = Decoder::new(&b);
        assert_eq!(d.u8("a").unwrap(), 1);
        assert_eq!(d.u32("b").unwrap(), 0x0203_0405);
        assert_eq!(d.u64("c").unwrap(), 7);
        assert_eq!(d.i32("d").unwrap(), -2);
        assert!(d.bool("e").unwrap());
        d.finish("all").unwrap();
    }

    #[test]
    fn truncated_fields_are_errors() {
        let mut d = Decoder::new(&[1, 2, 3]);
        assert!(matches!(
            d.u32("x"),
            Err(DecodeError::Truncated {
                what: "x",
                need: 4,
                have: 3,
                ..
            })
        ));
    }

    #[test]
    fn huge_lengths_allocate_nothing() {
        // A bufferlist claiming 4 GiB, and a list claiming 4 G items.
        let b = [0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(
            Decoder::new(&b).bytes("data"),
            Err(DecodeError::Truncated {
                need: 0xffff_ffff,
                ..
            })
        ));
        assert!(matches!(
            Decoder::new(&b).list(1, "list", |d| d.u8("item")),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn versioned_skips_unknown_tail_and_checks_compat() {
        let mut e = Encoder::new();
        e.versioned(3, 1, |e| {
            e.u32(9).u64(99);
        })
        .u8(0xaa);
        let b = e.into_bytes();
        let mut d = Decoder::new(&b);
        let v = d
            .versioned(1, "s", |d, v| {
                assert_eq!(v, 3);
                d.u32("f")
            })
            .unwrap();
        assert_eq!(v, 9);
        assert_eq!(d.u8("after").unwrap(), 0xaa);

        let mut e = Encoder::new();
        e.versioned(3, 2, |_| {});
        let b = e.into_bytes();
        assert!(matches!(
            Decoder::new(&b).versioned(1, "s", |_, _| Ok(())),
            Err(DecodeError::Incompatible {
                compat: 2,
                known: 1,
                ..
            })
        ));
    }

    #[test]
    fn versioned_body_cannot_read_past_its_length() {
        let mut e = Encoder::new();
        e.versioned(1, 1, |e| {
            e.u8(1);
        })
        .u64(5);
        let b = e.into_bytes();
        let r = Decoder::new(&b).versioned(1, "s", |d, _| d.u64("f"));
        assert!(matches!(r, Err(DecodeError::Truncated { what: "f", .. })));
    }

    #[test]
    fn strings_must_be_utf8() {
        let mut e = Encoder::new();
        e.bytes(&[0xff, 0xfe]);
        let b = e.into_bytes();
        assert_eq!(
            Decoder::new(&b).string("name"),
            Err(DecodeError::Utf8 { what: "name" })
        );
    }
}
