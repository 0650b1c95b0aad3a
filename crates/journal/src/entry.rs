//! Journal entries as they sit in a `journal_data.*` object: the framing,
//! the crc, and the zero padding between appends.
//!
//! An entry is `u64 preamble, u8 version (1), u64 entry_tid, u64 tag_tid,
//! u32 len, payload, u32 crc` (33 bytes around the payload), the crc being
//! Ceph's crc32c with seed 0 and no final inversion over everything before
//! it. Entries follow each other; Octopus and later may extend an object
//! with zeroes after an append (cls `journal.append` pads to the OSD's
//! allocation unit when the cluster requires Octopus clients), which the
//! reader skips in runs that end on 8-byte boundaries of the object, as
//! `journal::ObjectPlayer` does. An entry never starts with a zero byte.
//!
//! [`scan_object`] reads what is readable from a buffer read at some offset
//! of an object, and says where it stopped: at the end, before an entry
//! still being written (read again later), or at bytes that are not a
//! journal (corruption).

use super::codec::{DecodeError, Decoder, Encoder};

/// The preamble that starts every entry.
pub const PREAMBLE: u64 = 0x3141_5926_5358_9793;

/// The only entry version there is.
pub const ENTRY_VERSION: u8 = 1;

/// Bytes of an entry before its payload (preamble, version, tids, length).
pub const HEADER_LEN: usize = 8 + 1 + 8 + 8 + 4;

/// Bytes an entry adds around its payload (header and crc).
pub const ENTRY_OVERHEAD: usize = HEADER_LEN + 4;

/// Padding runs end on multiples of this many bytes of the object.
const PAD_ALIGN: u64 = 8;

/// Ceph's `crc32c(0, data)`: the Castagnoli crc with seed 0 and neither the
/// initial nor the final inversion of the usual definition.
pub fn ceph_crc32c(data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!0, data)
}

/// One entry of a journal object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Offset of the entry in its object.
    pub offset: u64,
    /// The tag (epoch of a lock owner) the entry belongs to.
    pub tag_tid: u64,
    /// The entry's number within its tag, from 0.
    pub entry_tid: u64,
    /// The payload (for librbd, an encoded [`super::event::EventEntry`]).
    pub payload: &'a [u8],
}

impl Entry<'_> {
    /// Bytes the entry takes in the object.
    pub fn encoded_len(&self) -> u64 {
        (ENTRY_OVERHEAD + self.payload.len()) as u64
    }
}

/// Encodes an entry as librbd's journaler appends it.
pub fn encode_entry(tag_tid: u64, entry_tid: u64, payload: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u64(PREAMBLE)
        .u8(ENTRY_VERSION)
        .u64(entry_tid)
        .u64(tag_tid)
        .bytes(payload);
    let mut b = e.into_bytes();
    let crc = ceph_crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Why a scan stopped where it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte was an entry or padding.
    Clean,
    /// The buffer ends inside an entry or a padding run: what follows
    /// [`ObjectScan::next_offset`] is being written; read it again later.
    Partial,
    /// The bytes at [`ObjectScan::next_offset`] are not a journal entry.
    Corrupt(EntryError),
}

/// What a buffer read from a journal object holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectScan<'a> {
    /// The entries, in object order.
    pub entries: Vec<Entry<'a>>,
    /// Offset in the object where reading should resume: after the last
    /// entry or padding decoded.
    pub next_offset: u64,
    /// Why the scan stopped.
    pub end: ScanEnd,
}

/// A journal object that cannot be read as entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// No preamble where an entry must start.
    #[error("no entry preamble at offset {offset}")]
    BadPreamble {
        /// Offset in the object.
        offset: u64,
    },
    /// An entry version other than 1.
    #[error("entry at offset {offset}: unknown version {version}")]
    BadVersion {
        /// Offset in the object.
        offset: u64,
        /// The version found.
        version: u8,
    },
    /// An entry longer than an object can hold.
    #[error("entry at offset {offset}: payload of {len} bytes exceeds {max}")]
    TooLarge {
        /// Offset in the object.
        offset: u64,
        /// The length found.
        len: u64,
        /// The largest payload accepted.
        max: u64,
    },
    /// The crc does not match the entry.
    #[error(
        "entry {tag_tid}/{entry_tid} at offset {offset}: crc {stored:#010x}, computed {computed:#010x}"
    )]
    BadCrc {
        /// Offset in the object.
        offset: u64,
        /// The entry's tag.
        tag_tid: u64,
        /// The entry's number.
        entry_tid: u64,
        /// The crc stored in the entry.
        stored: u32,
        /// The crc of the bytes.
        computed: u32,
    },
    /// A run that starts with a zero byte but is not all zeroes up to the
    /// next 8-byte boundary.
    #[error("bad padding at offset {offset}")]
    BadPadding {
        /// Offset in the object of the first non-zero byte.
        offset: u64,
    },
}

/// Reads the entries of `buf`, which holds the bytes of a journal object
/// from offset `base`. Payloads longer than `max_payload` (the object size
/// is a safe bound: an entry never spans objects) are corruption.
pub fn scan_object(buf: &[u8], base: u64, max_payload: u64) -> ObjectScan<'_> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    let end = loop {
        if pos == buf.len() {
            break ScanEnd::Clean;
        }
        let offset = base + pos as u64;
        let rest = &buf[pos..];
        if rest[0] == 0 {
            match pad_len(rest, offset) {
                Pad::Ok(n) => {
                    pos += n;
                    continue;
                }
                Pad::Partial => break ScanEnd::Partial,
                Pad::Bad(at) => {
                    break ScanEnd::Corrupt(EntryError::BadPadding {
                        offset: offset + at as u64,
                    });
                }
            }
        }
        match parse_entry(rest, offset, max_payload) {
            Ok(Some(entry)) => {
                pos += entry.encoded_len() as usize;
                entries.push(entry);
            }
            Ok(None) => break ScanEnd::Partial,
            Err(e) => break ScanEnd::Corrupt(e),
        }
    };
    ObjectScan {
        entries,
        next_offset: base + pos as u64,
        end,
    }
}

enum Pad {
    Ok(usize),
    Partial,
    Bad(usize),
}

/// A padding run at object offset `offset`: zeroes up to the next multiple
/// of 8 (a full 8 bytes when already aligned).
fn pad_len(rest: &[u8], offset: u64) -> Pad {
    let n = (PAD_ALIGN - offset % PAD_ALIGN) as usize;
    let avail = &rest[..n.min(rest.len())];
    if let Some(i) = avail.iter().position(|b| *b != 0) {
        return Pad::Bad(i);
    }
    if avail.len() < n {
        Pad::Partial
    } else {
        Pad::Ok(n)
    }
}

/// One entry at the start of `rest`; `None` when `rest` ends inside it.
fn parse_entry(
    rest: &[u8],
    offset: u64,
    max_payload: u64,
) -> Result<Option<Entry<'_>>, EntryError> {
    if rest.len() < HEADER_LEN {
        // Too short to tell a cut entry from garbage, unless the preamble
        // bytes already there are wrong.
        let have = &PREAMBLE.to_le_bytes()[..rest.len().min(8)];
        if rest[..have.len()] != *have {
            return Err(EntryError::BadPreamble { offset });
        }
        return Ok(None);
    }
    let mut d = Decoder::new(rest);
    let header = (|| -> Result<_, DecodeError> {
        Ok((
            d.u64("preamble")?,
            d.u8("version")?,
            d.u64("entry_tid")?,
            d.u64("tag_tid")?,
            d.u32("len")?,
        ))
    })()
    .expect("HEADER_LEN bytes are there");
    let (preamble, version, entry_tid, tag_tid, len) = header;
    if preamble != PREAMBLE {
        return Err(EntryError::BadPreamble { offset });
    }
    if version != ENTRY_VERSION {
        return Err(EntryError::BadVersion { offset, version });
    }
    let len = u64::from(len);
    if len > max_payload {
        return Err(EntryError::TooLarge {
            offset,
            len,
            max: max_payload,
        });
    }
    let total = ENTRY_OVERHEAD as u64 + len;
    if (rest.len() as u64) < total {
        return Ok(None);
    }
    let end = HEADER_LEN + len as usize;
    let payload = &rest[HEADER_LEN..end];
    let stored = u32::from_le_bytes(rest[end..end + 4].try_into().expect("4 bytes"));
    let computed = ceph_crc32c(&rest[..end]);
    if stored != computed {
        return Err(EntryError::BadCrc {
            offset,
            tag_tid,
            entry_tid,
            stored,
            computed,
        });
    }
    Ok(Some(Entry {
        offset,
        tag_tid,
        entry_tid,
        payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 24;

    #[test]
    fn crc_matches_ceph_vectors() {
        // src/test/common/test_crc32c.cc
        assert_eq!(ceph_crc32c(b"foo bar baz"), 4_119_623_852);
        assert_eq!(ceph_crc32c(b"whiz bang boom"), 2_360_230_088);
    }

    #[test]
    fn preamble_bytes() {
        let e = encode_entry(1, 2, b"x");
        assert_eq!(&e[..8], &[0x93, 0x97, 0x58, 0x53, 0x26, 0x59, 0x41, 0x31]);
        assert_eq!(e.len(), ENTRY_OVERHEAD + 1);
    }

    #[test]
    fn entries_round_trip() {
        let mut obj = encode_entry(3, 0, b"first");
        let second_at = obj.len() as u64;
        obj.extend(encode_entry(3, 4, b""));
        let s = scan_object(&obj, 0, MAX);
        assert_eq!(s.end, ScanEnd::Clean);
        assert_eq!(s.next_offset, obj.len() as u64);
        assert_eq!(s.entries.len(), 2);
        assert_eq!((s.entries[0].tag_tid, s.entries[0].entry_tid), (3, 0));
        assert_eq!(s.entries[0].payload, b"first");
        assert_eq!(s.entries[1].offset, second_at);
        assert_eq!(s.entries[1].entry_tid, 4);
    }

    #[test]
    fn truncated_entry_is_partial_at_every_cut() {
        let mut obj = encode_entry(1, 0, b"a");
        let whole = obj.len();
        obj.extend(encode_entry(1, 1, b"payload bytes"));
        for cut in whole + 1..obj.len() {
            let s = scan_object(&obj[..cut], 0, MAX);
            assert_eq!(s.end, ScanEnd::Partial, "cut at {cut}");
            assert_eq!(s.entries.len(), 1);
            assert_eq!(s.next_offset, whole as u64);
        }
    }

    #[test]
    fn bad_crc_is_corruption() {
        let mut obj = encode_entry(1, 0, b"abc");
        let n = obj.len();
        obj[n - 5] ^= 1; // last payload byte
        let s = scan_object(&obj, 0, MAX);
        assert!(matches!(
            s.end,
            ScanEnd::Corrupt(EntryError::BadCrc {
                entry_tid: 0,
                tag_tid: 1,
                ..
            })
        ));
        assert!(s.entries.is_empty());
    }

    #[test]
    fn bad_preamble_and_version() {
        let mut obj = encode_entry(1, 0, b"abc");
        obj[0] = 0x94;
        assert!(matches!(
            scan_object(&obj, 0, MAX).end,
            ScanEnd::Corrupt(EntryError::BadPreamble { offset: 0 })
        ));
        // Short garbage is corruption too, not a partial entry.
        assert!(matches!(
            scan_object(&[0x93, 0x11], 0, MAX).end,
            ScanEnd::Corrupt(EntryError::BadPreamble { .. })
        ));
        let mut obj = encode_entry(1, 0, b"abc");
        obj[8] = 2;
        assert!(matches!(
            scan_object(&obj, 0, MAX).end,
            ScanEnd::Corrupt(EntryError::BadVersion { version: 2, .. })
        ));
    }

    #[test]
    fn huge_length_is_corruption_not_a_wait() {
        let mut obj = encode_entry(1, 0, b"abc");
        obj[25..29].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            scan_object(&obj, 0, MAX).end,
            ScanEnd::Corrupt(EntryError::TooLarge {
                len: 0xffff_ffff,
                ..
            })
        ));
    }

    #[test]
    fn zero_padding_is_skipped_to_8_byte_boundaries() {
        let e1 = encode_entry(1, 0, b"abc"); // 36 bytes: pad 4 to 40
        let mut obj = e1.clone();
        obj.resize(4096, 0);
        let at = obj.len();
        obj.extend(encode_entry(1, 1, b"d"));
        obj.resize(8192, 0);
        let s = scan_object(&obj, 0, MAX);
        assert_eq!(s.end, ScanEnd::Clean);
        assert_eq!(s.entries.len(), 2);
        assert_eq!(s.entries[1].offset, at as u64);
        assert_eq!(s.next_offset, 8192);

        // Resuming in the middle of a padding run, at an unaligned offset.
        let s = scan_object(&obj[37..], 37, MAX);
        assert_eq!(s.end, ScanEnd::Clean);
        assert_eq!(s.entries.len(), 1);
    }

    #[test]
    fn bad_padding_is_corruption() {
        let mut obj = encode_entry(1, 0, b"abc");
        obj.extend([0, 0, 7, 0]);
        let s = scan_object(&obj, 0, MAX);
        assert_eq!(s.entries.len(), 1);
        assert_eq!(
            s.end,
            ScanEnd::Corrupt(EntryError::BadPadding { offset: 38 })
        );
    }

    #[test]
    fn cut_padding_is_partial() {
        let mut obj = encode_entry(1, 0, b"abc");
        obj.extend([0, 0]);
        let s = scan_object(&obj, 0, MAX);
        assert_eq!(s.end, ScanEnd::Partial);
        assert_eq!(s.next_offset, 36);
    }
}
