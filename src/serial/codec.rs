//! Framing of serial byte streams: newline-terminated lines, COBS frames ended by a zero byte,
//! and frames with a big-endian `u16` length in front.
//!
//! The [`Decoder`] takes bytes as they come off the port, in chunks of any size, and yields
//! whole frames and counted drops. It never fails and never panics on any input: what cannot be
//! a frame is dropped with a [`DropReason`] and decoding goes on from the next place a frame can
//! start:
//!
//! | framing | a frame is | `garbage` | `bad_cobs` | `overlong` (over `max_frame`) |
//! |---|---|---|---|---|
//! | line | bytes up to `\n` (a `\r` before it is removed) | a line that is not UTF-8 text, or holds control characters other than tab | — | dropped up to the next `\n` |
//! | cobs | COBS-encoded bytes up to a `0x00` | — | the bytes between two zeros do not decode | dropped up to the next `0x00` |
//! | length-prefixed | `u16` big-endian length, then that many bytes | an unfinished frame followed by silence ([`Decoder::idle`]) | — | its announced length is skipped |
//!
//! Every framing counts `partial` for an unfinished frame when the port goes away
//! ([`Decoder::reset`]). Empty frames (a blank line, two zeros in a row, length 0) carry nothing
//! and are skipped without being counted: devices send them to mark a frame start.
//!
//! A length-prefixed stream has no delimiter to resynchronise on, so the decoder uses silence
//! instead: devices send a frame in one burst, and an unfinished frame followed by a quiet gap
//! is taken for garbage (the stream was out of step) and decoding restarts at the next byte.
//!
//! [`encode`] frames a payload the same way for the way back (commands to a device).

use bytes::{BufMut, Bytes, BytesMut};

use crate::config::Framing;

/// Why bytes were dropped instead of becoming a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Bytes that cannot be a frame (see the module table).
    Garbage,
    /// Bytes between two COBS delimiters that do not decode.
    BadCobs,
    /// A frame longer than `max_frame`.
    Overlong,
    /// An unfinished frame when the port went away.
    Partial,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Garbage => "garbage",
            DropReason::BadCobs => "bad_cobs",
            DropReason::Overlong => "overlong",
            DropReason::Partial => "partial",
        }
    }
}

/// What the decoder made of the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Frame(Bytes),
    Dropped(DropReason),
}

/// Where a length-prefixed decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefixed {
    /// Reading the two length bytes (`buf` holds those seen).
    Header,
    /// Reading a body of this length into `buf`.
    Body(usize),
    /// Skipping the rest of an overlong frame.
    Skip(usize),
}

/// A stream decoder for one port (see the module doc).
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    max_frame: usize,
    buf: BytesMut,
    /// Line and COBS: dropping an overlong frame up to its delimiter (already counted).
    discarding: bool,
    prefixed: Prefixed,
}

impl Decoder {
    pub fn new(framing: Framing, max_frame: usize) -> Decoder {
        Decoder {
            framing,
            max_frame,
            buf: BytesMut::with_capacity(max_frame.min(64 * 1024) + 8),
            discarding: false,
            prefixed: Prefixed::Header,
        }
    }

    /// Decodes `data`, appending what came of it to `out` in stream order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Event>) {
        match self.framing {
            Framing::Line => self.feed_delimited(data, b'\n', out),
            Framing::Cobs => self.feed_delimited(data, 0, out),
            Framing::LengthPrefixed => self.feed_prefixed(data, out),
        }
    }

    /// True while bytes of an unfinished frame are held (or an overlong one is being skipped).
    pub fn in_frame(&self) -> bool {
        match self.framing {
            Framing::Line | Framing::Cobs => !self.buf.is_empty() || self.discarding,
            Framing::LengthPrefixed => self.prefixed != Prefixed::Header || !self.buf.is_empty(),
        }
    }

    /// The line went quiet. A length-prefixed decoder drops an unfinished frame as garbage (and
    /// stops discarding an overlong one) so that the next byte starts a new frame; delimited
    /// framings wait for their delimiter and return `None`.
    pub fn idle(&mut self) -> Option<DropReason> {
        if self.framing != Framing::LengthPrefixed {
            return None;
        }
        let reason = match self.prefixed {
            Prefixed::Header if self.buf.is_empty() => None,
            Prefixed::Header | Prefixed::Body(_) => Some(DropReason::Garbage),
            // Already counted as overlong when its header came.
            Prefixed::Skip(_) => None,
        };
        self.buf.clear();
        self.prefixed = Prefixed::Header;
        reason
    }

    /// The port went away: drops an unfinished frame (`Partial`) and starts afresh.
    pub fn reset(&mut self) -> Option<DropReason> {
        let partial = match self.framing {
            Framing::Line | Framing::Cobs => !self.buf.is_empty() && !self.discarding,
            Framing::LengthPrefixed => match self.prefixed {
                Prefixed::Header => !self.buf.is_empty(),
                Prefixed::Body(_) => true,
                // Already counted as overlong when its header came.
                Prefixed::Skip(_) => false,
            },
        };
        self.buf.clear();
        self.discarding = false;
        self.prefixed = Prefixed::Header;
        partial.then_some(DropReason::Partial)
    }

    /// The most encoded bytes a frame of `max_frame` bytes can take before its delimiter.
    fn max_encoded(&self) -> usize {
        match self.framing {
            // The payload and the `\r` that may end it.
            Framing::Line => self.max_frame + 1,
            // COBS adds one code byte per 254 payload bytes, and one more.
            Framing::Cobs => self.max_frame + self.max_frame / 254 + 1,
            Framing::LengthPrefixed => self.max_frame,
        }
    }

    fn feed_delimited(&mut self, mut data: &[u8], delimiter: u8, out: &mut Vec<Event>) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == delimiter) {
                Some(at) => {
                    let (head, rest) = data.split_at(at);
                    data = &rest[1..];
                    if self.discarding {
                        self.discarding = false;
                        self.buf.clear();
                        continue;
                    }
                    let event = if self.buf.is_empty() {
                        self.finish(head)
                    } else {
                        self.buf.extend_from_slice(head);
                        let whole = self.buf.split().freeze();
                        self.finish(&whole)
                    };
                    out.extend(event);
                }
                None => {
                    if !self.discarding {
                        if self.buf.len() + data.len() > self.max_encoded() {
                            self.buf.clear();
                            self.discarding = true;
                            out.push(Event::Dropped(DropReason::Overlong));
                        } else {
                            self.buf.extend_from_slice(data);
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Turns the bytes between two delimiters into a frame or a drop (`None`: empty, skipped).
    fn finish(&self, encoded: &[u8]) -> Option<Event> {
        if encoded.len() > self.max_encoded() {
            return Some(Event::Dropped(DropReason::Overlong));
        }
        match self.framing {
            Framing::Line => {
                let line = encoded.strip_suffix(b"\r").unwrap_or(encoded);
                if line.is_empty() {
                    None
                } else if line.len() > self.max_frame {
                    Some(Event::Dropped(DropReason::Overlong))
                } else if is_text(line) {
                    Some(Event::Frame(Bytes::copy_from_slice(line)))
                } else {
                    Some(Event::Dropped(DropReason::Garbage))
                }
            }
            Framing::Cobs => {
                if encoded.is_empty() {
                    return None;
                }
                match cobs_decode(encoded) {
                    Some(frame) if frame.is_empty() => None,
                    Some(frame) if frame.len() > self.max_frame => {
                        Some(Event::Dropped(DropReason::Overlong))
                    }
                    Some(frame) => Some(Event::Frame(frame.into())),
                    None => Some(Event::Dropped(DropReason::BadCobs)),
                }
            }
            // Not delimited; never called for it.
            Framing::LengthPrefixed => None,
        }
    }

    fn feed_prefixed(&mut self, mut data: &[u8], out: &mut Vec<Event>) {
        while !data.is_empty() {
            match self.prefixed {
                Prefixed::Header => {
                    let need = 2 - self.buf.len();
                    let take = need.min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.buf.len() == 2 {
                        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
                        self.buf.clear();
                        self.prefixed = if len == 0 {
                            Prefixed::Header
                        } else if len > self.max_frame {
                            out.push(Event::Dropped(DropReason::Overlong));
                            Prefixed::Skip(len)
                        } else {
                            Prefixed::Body(len)
                        };
                    }
                }
                Prefixed::Body(len) => {
                    let take = (len - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.buf.len() == len {
                        out.push(Event::Frame(self.buf.split().freeze()));
                        self.prefixed = Prefixed::Header;
                    }
                }
                Prefixed::Skip(left) => {
                    let take = left.min(data.len());
                    data = &data[take..];
                    self.prefixed = if take == left {
                        Prefixed::Header
                    } else {
                        Prefixed::Skip(left - take)
                    };
                }
            }
        }
    }
}

/// UTF-8 without control characters other than tab.
fn is_text(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|s| !s.chars().any(|c| c.is_control() && c != '\t'))
}

/// Decodes one COBS frame (without its zero delimiter); `None` when it is not valid COBS.
fn cobs_decode(encoded: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let code = usize::from(encoded[i]);
        // A zero cannot appear inside a frame (it is the delimiter); the caller split on it.
        if code == 0 {
            return None;
        }
        let block = encoded.get(i + 1..i + code)?;
        out.extend_from_slice(block);
        i += code;
        // A block shorter than 254 bytes stood for a zero, except at the very end.
        if code < 0xff && i < encoded.len() {
            out.push(0);
        }
    }
    Some(out)
}

fn cobs_encode(payload: &[u8], out: &mut BytesMut) {
    out.reserve(payload.len() + payload.len() / 254 + 2);
    let mut code_at = out.len();
    out.put_u8(0);
    let mut code: u8 = 1;
    for &b in payload {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.put_u8(0);
            code = 1;
        } else {
            out.put_u8(b);
            code += 1;
            if code == 0xff {
                out[code_at] = code;
                code_at = out.len();
                out.put_u8(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
}

/// Why a payload cannot be framed for a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a line command may not contain a newline")]
    NewlineInLine,
    #[error("a command of {0} bytes does not fit a u16 length prefix")]
    TooLongForPrefix(usize),
}

/// Frames `payload` for a device, appending the bytes to `out`.
pub fn encode(framing: Framing, payload: &[u8], out: &mut BytesMut) -> Result<(), EncodeError> {
    match framing {
        Framing::Line => {
            if payload.contains(&b'\n') {
                return Err(EncodeError::NewlineInLine);
            }
            out.extend_from_slice(payload);
            out.put_u8(b'\n');
        }
        Framing::Cobs => {
            cobs_encode(payload, out);
            out.put_u8(0);
        }
        Framing::LengthPrefixed => {
            let len = u16::try_from(payload.len())
                .map_err(|_| EncodeError::TooLongForPrefix(payload.len()))?;
            out.put_u16(len);
            out.extend_from_slice(payload);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use DropReason::*;

    fn f(bytes: &[u8]) -> Event {
        Event::Frame(Bytes::copy_from_slice(bytes))
    }
    fn d(reason: DropReason) -> Event {
        Event::Dropped(reason)
    }

    /// Feeds `chunks` one after the other.
    fn decode(framing: Framing, max: usize, chunks: &[&[u8]]) -> Vec<Event> {
        let mut dec = Decoder::new(framing, max);
        let mut out = Vec::new();
        for c in chunks {
            dec.feed(c, &mut out);
        }
        out
    }

    /// Feeds `input` whole, then split at every position, then byte by byte: framing must not
    /// depend on how reads cut the stream.
    fn decode_every_split(framing: Framing, max: usize, input: &[u8]) -> Vec<Event> {
        let whole = decode(framing, max, &[input]);
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(
                decode(framing, max, &[a, b]),
                whole,
                "{framing:?} split at {at} of {input:?}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            decode(framing, max, &bytes),
            whole,
            "{framing:?} byte by byte"
        );
        whole
    }

    #[test]
    fn line_table() {
        let cases: &[(&[u8], &[Event])] = &[
            (b"a\n", &[Event::Frame(Bytes::from_static(b"a"))]),
            (
                b"one\r\ntwo\n",
                &[
                    Event::Frame(Bytes::from_static(b"one")),
                    Event::Frame(Bytes::from_static(b"two")),
                ],
            ),
            (b"\n\r\n\n", &[]),
            (
                b"tab\there\n",
                &[Event::Frame(Bytes::from_static(b"tab\there"))],
            ),
            (
                b"caf\xc3\xa9\n",
                &[Event::Frame(Bytes::from_static(b"caf\xc3\xa9"))],
            ),
            (b"\xff\xfe\n", &[Event::Dropped(Garbage)]),
            (b"a\x00b\n", &[Event::Dropped(Garbage)]),
            (b"bell\x07\n", &[Event::Dropped(Garbage)]),
            (b"a\rb\n", &[Event::Dropped(Garbage)]),
            (
                b"12345678\n",
                &[Event::Frame(Bytes::from_static(b"12345678"))],
            ),
            (
                b"12345678\r\n",
                &[Event::Frame(Bytes::from_static(b"12345678"))],
            ),
            (b"123456789\n", &[Event::Dropped(Overlong)]),
            (
                b"123456789012345\nok\n",
                &[
                    Event::Dropped(Overlong),
                    Event::Frame(Bytes::from_static(b"ok")),
                ],
            ),
            (b"no end", &[]),
        ];
        for (input, want) in cases {
            let got = decode_every_split(Framing::Line, 8, input);
            assert_eq!(&got, want, "line {input:?}");
        }
    }

    #[test]
    fn line_overlong_is_counted_once_and_resyncs() {
        let mut dec = Decoder::new(Framing::Line, 4);
        let mut out = Vec::new();
        dec.feed(b"abcdef", &mut out);
        dec.feed(b"ghijkl", &mut out);
        dec.feed(b"mn\nok\n", &mut out);
        assert_eq!(out, vec![d(Overlong), f(b"ok")]);
        assert!(!dec.in_frame());
    }

    #[test]
    fn cobs_table() {
        let cases: &[(&[u8], &[Event])] = &[
            (
                &[0x01, 0x01, 0x00],
                &[Event::Frame(Bytes::from_static(&[0]))],
            ),
            (
                &[0x03, 0x11, 0x22, 0x02, 0x33, 0x00],
                &[Event::Frame(Bytes::from_static(&[0x11, 0x22, 0x00, 0x33]))],
            ),
            (
                &[0x02, 0x41, 0x01, 0x00],
                &[Event::Frame(Bytes::from_static(&[0x41, 0x00]))],
            ),
            // Empty frames and delimiter runs are skipped.
            (
                &[0x00, 0x00, 0x01, 0x00, 0x02, 0x41, 0x00],
                &[Event::Frame(Bytes::from_static(b"A"))],
            ),
            // A code that points past the end of the frame.
            (&[0x05, 0x41, 0x00], &[Event::Dropped(BadCobs)]),
            (
                &[0x05, 0x41, 0x00, 0x02, 0x42, 0x00],
                &[
                    Event::Dropped(BadCobs),
                    Event::Frame(Bytes::from_static(b"B")),
                ],
            ),
            // Max 4 payload bytes: 5 encoded bytes fit, a 5-byte payload does not.
            (
                &[0x05, 1, 2, 3, 4, 0x00],
                &[Event::Frame(Bytes::from_static(&[1, 2, 3, 4]))],
            ),
            (&[0x06, 1, 2, 3, 4, 5, 0x00], &[Event::Dropped(Overlong)]),
            (
                &[0x09, 1, 2, 3, 4, 5, 6, 7, 8, 0x00, 0x02, 0x43, 0x00],
                &[
                    Event::Dropped(Overlong),
                    Event::Frame(Bytes::from_static(b"C")),
                ],
            ),
            // Five zeros: six code bytes, over the encoded bound of a 4-byte frame.
            (
                &[0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00],
                &[Event::Dropped(Overlong)],
            ),
            (&[0x02, 0x41], &[]),
        ];
        for (input, want) in cases {
            let got = decode_every_split(Framing::Cobs, 4, input);
            assert_eq!(&got, want, "cobs {input:?}");
        }
    }

    #[test]
    fn cobs_round_trips_edge_lengths() {
        let payloads: Vec<Vec<u8>> = vec![
            vec![0],
            vec![0, 0, 0],
            vec![1; 253],
            vec![1; 254],
            vec![1; 255],
            vec![7; 600],
            (0..=255u8).collect(),
            (0..1000u32).map(|i| (i % 7) as u8).collect(),
        ];
        for p in payloads {
            let mut enc = BytesMut::new();
            encode(Framing::Cobs, &p, &mut enc).unwrap();
            assert_eq!(enc.iter().filter(|&&b| b == 0).count(), 1, "one delimiter");
            assert_eq!(*enc.last().unwrap(), 0);
            let got = decode_every_split(Framing::Cobs, 1000, &enc);
            assert_eq!(got, vec![f(&p)], "payload of {}", p.len());
        }
    }

    #[test]
    fn cobs_checks_the_decoded_length_too() {
        // max_frame 300 allows 302 encoded bytes; 301 zeros encode into exactly 302.
        let mut enc = BytesMut::new();
        encode(Framing::Cobs, &[0u8; 301], &mut enc).unwrap();
        assert_eq!(enc.len(), 303);
        assert_eq!(decode(Framing::Cobs, 300, &[&enc]), vec![d(Overlong)]);
        assert_eq!(decode(Framing::Cobs, 301, &[&enc]), vec![f(&[0u8; 301])]);
    }

    #[test]
    fn length_prefixed_table() {
        let cases: &[(&[u8], &[Event])] = &[
            (&[0, 1, b'a'], &[Event::Frame(Bytes::from_static(b"a"))]),
            (
                &[0, 2, 0, b'\n', 0, 1, 0],
                &[
                    Event::Frame(Bytes::from_static(&[0, b'\n'])),
                    Event::Frame(Bytes::from_static(&[0])),
                ],
            ),
            (
                &[0, 0, 0, 0, 0, 1, b'z'],
                &[Event::Frame(Bytes::from_static(b"z"))],
            ),
            (
                &[0, 4, 1, 2, 3, 4],
                &[Event::Frame(Bytes::from_static(&[1, 2, 3, 4]))],
            ),
            // Overlong: counted, its announced bytes skipped, then back in step.
            (
                &[0, 5, 1, 2, 3, 4, 5, 0, 1, b'k'],
                &[
                    Event::Dropped(Overlong),
                    Event::Frame(Bytes::from_static(b"k")),
                ],
            ),
            (&[0, 3, b'a'], &[]),
        ];
        for (input, want) in cases {
            let got = decode_every_split(Framing::LengthPrefixed, 4, input);
            assert_eq!(&got, want, "length-prefixed {input:?}");
        }
    }

    #[test]
    fn length_prefixed_resyncs_after_silence() {
        let mut dec = Decoder::new(Framing::LengthPrefixed, 16);
        let mut out = Vec::new();
        dec.feed(&[0x00, 0x09, 0xde, 0xad], &mut out);
        assert!(out.is_empty());
        assert!(dec.in_frame());
        assert_eq!(dec.idle(), Some(Garbage));
        assert!(!dec.in_frame());
        dec.feed(&[0x00, 0x02, b'o', b'k'], &mut out);
        assert_eq!(out, vec![f(b"ok")]);
        // One stray byte (half a header) is garbage too.
        dec.feed(&[0x07], &mut out);
        assert_eq!(dec.idle(), Some(Garbage));
        // Silence with nothing pending drops nothing.
        assert_eq!(dec.idle(), None);
        // Silence while discarding an overlong frame ends the discard without counting again.
        out.clear();
        dec.feed(&[0xff, 0xff, 1, 2, 3], &mut out);
        assert_eq!(out, vec![d(Overlong)]);
        assert_eq!(dec.idle(), None);
        dec.feed(&[0x00, 0x01, b'x'], &mut out);
        assert_eq!(out, vec![d(Overlong), f(b"x")]);
    }

    #[test]
    fn delimited_framings_ignore_silence() {
        for framing in [Framing::Line, Framing::Cobs] {
            let mut dec = Decoder::new(framing, 16);
            let mut out = Vec::new();
            dec.feed(b"\x03ab", &mut out);
            assert_eq!(dec.idle(), None);
            let end: &[u8] = if framing == Framing::Line {
                b"\n"
            } else {
                b"\x00"
            };
            dec.feed(end, &mut out);
            assert_eq!(out.len(), 1, "{framing:?}: {out:?}");
        }
    }

    #[test]
    fn reset_counts_a_partial_frame_once() {
        let cases: &[(Framing, &[u8], Option<DropReason>)] = &[
            (Framing::Line, b"half", Some(Partial)),
            (Framing::Line, b"whole\n", None),
            (Framing::Line, b"0123456789abcdef0123", None), // overlong, counted as that
            (Framing::Cobs, &[0x03, 0x41], Some(Partial)),
            (Framing::Cobs, &[0x02, 0x41, 0x00], None),
            (Framing::LengthPrefixed, &[0x00], Some(Partial)),
            (Framing::LengthPrefixed, &[0x00, 0x03], Some(Partial)),
            (Framing::LengthPrefixed, &[0x00, 0x03, 0x41], Some(Partial)),
            (Framing::LengthPrefixed, &[0x00, 0x01, 0x41], None),
            (Framing::LengthPrefixed, &[0x01, 0x00, 0x41], None), // overlong, being skipped
        ];
        for (framing, input, want) in cases {
            let mut dec = Decoder::new(*framing, 16);
            let mut out = Vec::new();
            dec.feed(input, &mut out);
            assert_eq!(dec.reset(), *want, "{framing:?} {input:?}");
            assert_eq!(dec.reset(), None, "second reset of {framing:?} {input:?}");
            assert!(!dec.in_frame());
        }
    }

    #[test]
    fn encode_table() {
        type Case<'a> = (Framing, &'a [u8], Result<&'a [u8], EncodeError>);
        let cases: &[Case] = &[
            (Framing::Line, b"on", Ok(b"on\n")),
            (Framing::Line, b"", Ok(b"\n")),
            (Framing::Line, b"a\nb", Err(EncodeError::NewlineInLine)),
            (Framing::Cobs, b"", Ok(&[0x01, 0x00])),
            (
                Framing::Cobs,
                &[0x11, 0x00, 0x22],
                Ok(&[0x02, 0x11, 0x02, 0x22, 0x00]),
            ),
            (
                Framing::LengthPrefixed,
                b"hi",
                Ok(&[0x00, 0x02, b'h', b'i']),
            ),
            (Framing::LengthPrefixed, b"", Ok(&[0x00, 0x00])),
        ];
        for (framing, payload, want) in cases {
            let mut out = BytesMut::new();
            let got = encode(*framing, payload, &mut out).map(|()| out.to_vec());
            assert_eq!(
                got,
                want.clone().map(<[u8]>::to_vec),
                "{framing:?} {payload:?}"
            );
        }
        let big = vec![1u8; 70_000];
        assert_eq!(
            encode(Framing::LengthPrefixed, &big, &mut BytesMut::new()),
            Err(EncodeError::TooLongForPrefix(70_000))
        );
    }

    #[test]
    fn encoded_frames_decode_back() {
        for framing in [Framing::Line, Framing::Cobs, Framing::LengthPrefixed] {
            let payloads: Vec<Vec<u8>> = (0..50u32)
                .map(|i| {
                    if framing == Framing::Line {
                        format!("reading {i} value {}", i * 31).into_bytes()
                    } else {
                        (0..(i * 5)).map(|j| (j * i) as u8).collect()
                    }
                })
                .filter(|p| !p.is_empty())
                .collect();
            let mut stream = BytesMut::new();
            for p in &payloads {
                encode(framing, p, &mut stream).unwrap();
            }
            let mut dec = Decoder::new(framing, 1024);
            let mut out = Vec::new();
            for chunk in stream.chunks(7) {
                dec.feed(chunk, &mut out);
            }
            let want: Vec<Event> = payloads.iter().map(|p| f(p)).collect();
            assert_eq!(out, want, "{framing:?}");
        }
    }

    /// Arbitrary bytes never panic and never yield a frame over `max_frame`.
    #[test]
    fn noise_never_panics_nor_yields_overlong_frames() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut noise = vec![0u8; 64 * 1024];
        for b in noise.iter_mut() {
            // xorshift64: deterministic noise without a dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = (state >> 24) as u8;
        }
        for framing in [Framing::Line, Framing::Cobs, Framing::LengthPrefixed] {
            let mut dec = Decoder::new(framing, 32);
            let mut out = Vec::new();
            for chunk in noise.chunks(97) {
                dec.feed(chunk, &mut out);
                let _ = dec.idle();
            }
            let _ = dec.reset();
            for e in &out {
                if let Event::Frame(frame) = e {
                    assert!(
                        frame.len() <= 32 && !frame.is_empty(),
                        "{framing:?}: {frame:?}"
                    );
                }
            }
        }
    }
}
