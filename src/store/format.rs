//! The log's record framing: what one record looks like on flash, and the pure functions that
//! write and check it. No I/O here.
//!
//! A record is a 16-byte header and a body, padded with zeros to a multiple of 8 bytes:
//!
//! ```text
//! 0..4    header CRC32C over (position as u64 LE ‖ bytes 4..16 of the header)
//! 4..8    body length (u32 LE)
//! 8       kind
//! 9..12   zero
//! 12..16  body CRC32C over (position as u64 LE ‖ body)
//! 16..    body, then zeros up to the next multiple of 8
//! ```
//!
//! The *position* is the record's offset in the whole log (chunk number × segment size + offset
//! in the segment). Both CRCs start with it, so a record is only ever valid at the position it
//! was written for: stale bytes left in a reused segment (written for an older chunk) and a
//! record copied elsewhere fail the check. The header has its own CRC so that a record whose body
//! is damaged can be skipped by its length, and a scan can look for the next record after damage.

/// The size of a page: the unit of every write.
pub const PAGE: u64 = 4096;
/// The size of a record header.
pub const HEADER: usize = 16;
/// Records start at multiples of this.
pub const ALIGN: u64 = 8;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The first record of every segment: which chunk of the log it holds (see [`Start`]).
    Start = 1,
    /// An outbox record: sequence, cumulative outbox bytes before it, prost `OutboxRecord`.
    Append = 2,
    /// The acknowledged cursor: every outbox record before it is gone (see [`Cursor`]).
    Ack = 3,
    /// A keyed state entry set: space, key, value (retained messages, sessions).
    Set = 4,
    /// A keyed state entry removed: space, key.
    Remove = 5,
    /// A checkpoint begins here: the outbox cursor at this point; the keyed state follows as
    /// [`Kind::Set`] records.
    CheckpointBegin = 6,
    /// The checkpoint that began at the position in the body is complete.
    CheckpointEnd = 7,
    /// Filler with no meaning (keeps a commit from ending on a page boundary).
    Pad = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Start,
            2 => Kind::Append,
            3 => Kind::Ack,
            4 => Kind::Set,
            5 => Kind::Remove,
            6 => Kind::CheckpointBegin,
            7 => Kind::CheckpointEnd,
            8 => Kind::Pad,
            _ => return None,
        })
    }
}

/// The bytes a record with a body of `body_len` takes in the log.
pub fn record_len(body_len: usize) -> u64 {
    (HEADER as u64 + body_len as u64).div_ceil(ALIGN) * ALIGN
}

fn crc(position: u64, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&position.to_le_bytes()), bytes)
}

/// Appends the record (`kind`, `body`) for `position` to `out`, padded to [`ALIGN`].
pub fn encode(out: &mut Vec<u8>, position: u64, kind: Kind, body: &[u8]) {
    let start = out.len();
    let mut header = [0u8; HEADER];
    header[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[8] = kind as u8;
    header[12..16].copy_from_slice(&crc(position, body).to_le_bytes());
    let hcrc = crc(position, &header[4..]);
    header[0..4].copy_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    let len = record_len(body.len()) as usize;
    out.resize(start + len, 0);
}

/// What a look at the bytes at a position found.
#[derive(Debug, PartialEq, Eq)]
pub enum Look<'a> {
    /// A whole, intact record written for this position.
    Record {
        kind: Kind,
        body: &'a [u8],
        len: u64,
    },
    /// A header written for this position whose body is damaged or cut short: skip `len`.
    BadBody { len: u64 },
    /// No record written for this position starts here (zeros, stale bytes, a damaged header).
    Nothing,
}

/// Looks at `bytes` (starting at log position `position`) for a record; `max_len` bounds the
/// record's length (what is left of the segment).
pub fn look(bytes: &[u8], position: u64, max_len: u64) -> Look<'_> {
    if bytes.len() < HEADER {
        return Look::Nothing;
    }
    let header = &bytes[..HEADER];
    let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if stored != crc(position, &header[4..]) {
        return Look::Nothing;
    }
    let body_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let len = record_len(body_len);
    let Some(kind) = Kind::from_u8(header[8]) else {
        return Look::Nothing;
    };
    if header[9..12] != [0, 0, 0] || len > max_len {
        return Look::Nothing;
    }
    let end = HEADER + body_len;
    if bytes.len() < end {
        return Look::BadBody { len };
    }
    let body = &bytes[HEADER..end];
    let body_crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if body_crc != crc(position, body) {
        return Look::BadBody { len };
    }
    Look::Record { kind, body, len }
}

/// A little-endian reader over a record body; every read is checked.
pub struct Body<'a>(pub &'a [u8]);

impl<'a> Body<'a> {
    pub fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_at_checked(8)?;
        self.0 = rest;
        Some(u64::from_le_bytes(head.try_into().ok()?))
    }

    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A byte string with a u32 length in front.
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(4)?;
        let n = u32::from_le_bytes(head.try_into().ok()?) as usize;
        let (bytes, rest) = rest.split_at_checked(n)?;
        self.0 = rest;
        Some(bytes)
    }

    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// Writes a byte string with a u32 length in front.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The body of a [`Kind::Start`] record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Which chunk of the log the segment holds (its position is `chunk × segment size`).
    pub chunk: u64,
    /// The store's epoch (random, made when the store was created).
    pub epoch: u64,
    /// Where the checkpoint to rebuild the state from begins: one written right after this
    /// record in the same commit, or the last complete one before.
    pub checkpoint: u64,
    /// The last complete checkpoint before this segment (used when `checkpoint` turns out
    /// incomplete: a torn first commit of the segment).
    pub fallback: u64,
    /// The sequence the next outbox record gets when this segment was started.
    pub next_seq: u64,
}

impl Start {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40);
        for v in [
            self.chunk,
            self.epoch,
            self.checkpoint,
            self.next_seq,
            self.fallback,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(body: &[u8]) -> Option<Start> {
        let mut b = Body(body);
        Some(Start {
            chunk: b.u64()?,
            epoch: b.u64()?,
            checkpoint: b.u64()?,
            next_seq: b.u64()?,
            fallback: b.u64()?,
        })
    }
}

/// The outbox's front: the body of [`Kind::Ack`] and [`Kind::CheckpointBegin`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Every outbox record with a smaller sequence is gone (acknowledged or dropped).
    pub first_seq: u64,
    /// The log position of the first live outbox record at or after `first_seq` (or where the
    /// next one will go, when none is live).
    pub position: u64,
    /// The cumulative outbox bytes before that record.
    pub cum: u64,
    /// The sequence the next outbox record gets.
    pub next_seq: u64,
    /// The cumulative outbox bytes after the last record.
    pub cum_next: u64,
}

impl Cursor {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40);
        for v in [
            self.first_seq,
            self.position,
            self.cum,
            self.next_seq,
            self.cum_next,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(body: &[u8]) -> Option<Cursor> {
        let mut b = Body(body);
        Some(Cursor {
            first_seq: b.u64()?,
            position: b.u64()?,
            cum: b.u64()?,
            next_seq: b.u64()?,
            cum_next: b.u64()?,
        })
    }
}

/// The head of an [`Kind::Append`] body; the encoded `OutboxRecord` follows it.
pub fn append_body(seq: u64, cum: u64, encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + encoded.len());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&cum.to_le_bytes());
    out.extend_from_slice(encoded);
    out
}

/// Splits an [`Kind::Append`] body into sequence, cumulative bytes and the encoded record.
pub fn split_append(body: &[u8]) -> Option<(u64, u64, &[u8])> {
    let mut b = Body(body);
    let seq = b.u64()?;
    let cum = b.u64()?;
    Some((seq, cum, b.rest()))
}

/// The body of a [`Kind::Set`] (with a value) or [`Kind::Remove`] (without) record.
pub fn entry_body(space: u8, key: &[u8], value: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len() + value.map_or(0, |v| v.len()));
    out.push(space);
    put_bytes(&mut out, key);
    if let Some(value) = value {
        put_bytes(&mut out, value);
    }
    out
}

/// An entry body's parts: space, key and (for [`Kind::Set`]) value.
pub type EntryParts<'a> = (u8, &'a [u8], Option<&'a [u8]>);

/// Splits an entry body into space, key and (for [`Kind::Set`]) value.
pub fn split_entry(body: &[u8], with_value: bool) -> Option<EntryParts<'_>> {
    let mut b = Body(body);
    let space = b.u8()?;
    let key = b.bytes()?;
    let value = if with_value { Some(b.bytes()?) } else { None };
    Some((space, key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(position: u64, kind: Kind, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, position, kind, body);
        out
    }

    #[test]
    fn a_record_reads_back_only_at_its_own_position() {
        let bytes = one(4096, Kind::Append, b"hello");
        assert_eq!(bytes.len(), 24);
        assert_eq!(
            look(&bytes, 4096, 1 << 20),
            Look::Record {
                kind: Kind::Append,
                body: b"hello",
                len: 24
            }
        );
        // The same bytes at another position (a reused segment, a copy) are nothing.
        assert_eq!(look(&bytes, 4096 + (4 << 20), 1 << 20), Look::Nothing);
        assert_eq!(look(&bytes, 0, 1 << 20), Look::Nothing);
    }

    #[test]
    fn zeros_and_short_input_are_nothing() {
        assert_eq!(look(&[0u8; 64], 0, 1 << 20), Look::Nothing);
        assert_eq!(look(&[0u8; 64], 8, 1 << 20), Look::Nothing);
        assert_eq!(look(&[1u8; 10], 8, 1 << 20), Look::Nothing);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let body = entry_body(1, b"a/b", Some(b"value"));
        let bytes = one(777 * 8, Kind::Set, &body);
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            match look(&damaged, 777 * 8, 1 << 20) {
                Look::Record { .. } => {
                    // Only a flip in the zero padding after the body leaves the record intact.
                    assert!(bit / 8 >= HEADER + body.len(), "bit {bit} passed");
                }
                Look::BadBody { len } => {
                    assert!(bit / 8 >= HEADER, "bit {bit} in the header gave BadBody");
                    assert_eq!(len, bytes.len() as u64);
                }
                Look::Nothing => assert!(bit / 8 < HEADER, "bit {bit} in the body gave Nothing"),
            }
        }
    }

    #[test]
    fn a_cut_body_is_bad_and_a_cut_header_is_nothing() {
        let bytes = one(64, Kind::Append, &[7u8; 100]);
        for cut in 0..bytes.len() {
            let got = look(&bytes[..cut], 64, 1 << 20);
            if cut < HEADER {
                assert_eq!(got, Look::Nothing, "cut {cut}");
            } else if cut < HEADER + 100 {
                assert_eq!(got, Look::BadBody { len: 120 }, "cut {cut}");
            }
        }
    }

    #[test]
    fn a_record_longer_than_the_room_left_is_nothing() {
        let bytes = one(0, Kind::Append, &[1u8; 100]);
        assert_eq!(look(&bytes, 0, 64), Look::Nothing);
    }

    #[test]
    fn bodies_round_trip() {
        let start = Start {
            chunk: 3,
            epoch: 99,
            checkpoint: 12345,
            next_seq: 7,
            fallback: 99,
        };
        assert_eq!(Start::decode(&start.encode()), Some(start));
        let cursor = Cursor {
            first_seq: 5,
            position: 4096,
            cum: 10,
            next_seq: 9,
            cum_next: 400,
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(
            split_append(&append_body(4, 8, b"rec")),
            Some((4, 8, &b"rec"[..]))
        );
        assert_eq!(
            split_entry(&entry_body(1, b"k", Some(b"v")), true),
            Some((1, &b"k"[..], Some(&b"v"[..])))
        );
        assert_eq!(
            split_entry(&entry_body(2, b"k", None), false),
            Some((2, &b"k"[..], None))
        );
        assert_eq!(
            split_entry(&[1, 9, 0, 0, 0], false),
            None,
            "key past the end"
        );
        assert_eq!(Start::decode(&[0; 8]), None);
    }
}
