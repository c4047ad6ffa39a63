//! What a device's registers cost on the wire: the reads that fetch them, the bytes of each
//! request and reply, and the RTU timing (character time, the 3.5-character silence between
//! frames). Pure functions, no I/O; the benchmark uses them for the physical limit.

use std::time::Duration;

use crate::config::{Parity, RegisterConfig, RegisterKind};

/// The most registers one read may ask for (Modbus application protocol, 6.3).
pub const MAX_READ_WORDS: u16 = 125;
/// The most coils or discrete inputs one read may ask for (6.1).
pub const MAX_READ_BITS: u16 = 2000;

/// One read request: `count` entries of `kind` from `address`, covering `registers` (indices
/// into the device's register list).
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub kind: RegisterKind,
    pub address: u16,
    pub count: u16,
    pub registers: Vec<usize>,
}

/// The fewest reads that fetch every register: registers of a kind that touch or overlap are
/// read together, up to the protocol's limit per read. Gaps are never read, since a device may
/// answer an address it does not have with an exception.
pub fn plan(registers: &[RegisterConfig]) -> Vec<Read> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| (registers[i].kind, registers[i].address));
    let mut reads: Vec<Read> = Vec::new();
    for i in order {
        let r = &registers[i];
        let width = r.value_type().width();
        let end = u32::from(r.address) + u32::from(width);
        let limit = u32::from(if r.kind.is_bit() {
            MAX_READ_BITS
        } else {
            MAX_READ_WORDS
        });
        if let Some(last) = reads.last_mut() {
            let last_end = u32::from(last.address) + u32::from(last.count);
            let joined = end.max(last_end) - u32::from(last.address);
            if last.kind == r.kind && u32::from(r.address) <= last_end && joined <= limit {
                last.count = joined as u16;
                last.registers.push(i);
                continue;
            }
        }
        reads.push(Read {
            kind: r.kind,
            address: r.address,
            count: width,
            registers: vec![i],
        });
    }
    reads
}

/// Bytes of a read request: unit, function, address, count, CRC.
pub const READ_REQUEST_BYTES: usize = 8;

/// Bytes of the reply to `read`: unit, function, byte count, the data, CRC.
pub fn read_reply_bytes(read: &Read) -> usize {
    let data = if read.kind.is_bit() {
        usize::from(read.count).div_ceil(8)
    } else {
        2 * usize::from(read.count)
    };
    5 + data
}

/// Bytes of a write request of `words` registers (`None`: one coil), and of its reply.
pub fn write_bytes(words: Option<usize>) -> (usize, usize) {
    match words {
        // Write single coil / single register: unit, function, address, value, CRC.
        None | Some(1) => (8, 8),
        // Write multiple registers: unit, function, address, count, byte count, data, CRC.
        Some(n) => (9 + 2 * n, 8),
    }
}

/// The line's settings that decide its timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineTiming {
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
}

impl LineTiming {
    /// Bits per character: start, data, parity, stop.
    pub fn char_bits(&self) -> u32 {
        1 + u32::from(self.data_bits)
            + u32::from(self.parity != Parity::None)
            + u32::from(self.stop_bits)
    }

    /// How long `bytes` take on the wire.
    pub fn bytes_time(&self, bytes: usize) -> Duration {
        let bits = bytes as u64 * u64::from(self.char_bits());
        Duration::from_nanos(bits * 1_000_000_000 / u64::from(self.baud.max(1)))
    }

    /// The silence that ends a frame: 3.5 characters, and 1.75 ms above 19,200 baud (Modbus
    /// over serial line, 2.5.1.1).
    pub fn frame_gap(&self) -> Duration {
        if self.baud > 19_200 {
            Duration::from_micros(1_750)
        } else {
            let bits = 7 * u64::from(self.char_bits());
            Duration::from_nanos(bits * 1_000_000_000 / (2 * u64::from(self.baud.max(1))))
        }
    }

    /// The wire time of one transaction: request, silence, reply, silence.
    pub fn transaction_time(&self, request: usize, reply: usize) -> Duration {
        self.bytes_time(request + reply) + 2 * self.frame_gap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ValueType;

    fn reg(kind: RegisterKind, address: u16, ty: Option<ValueType>) -> RegisterConfig {
        RegisterConfig {
            name: format!("r{address}"),
            kind,
            address,
            value_type: ty,
            scale: None,
        }
    }

    #[test]
    fn touching_registers_of_a_kind_are_read_together() {
        let regs = vec![
            reg(RegisterKind::Holding, 2, Some(ValueType::F32)),
            reg(RegisterKind::Holding, 0, None),
            reg(RegisterKind::Input, 1, None),
            reg(RegisterKind::Holding, 1, None),
            reg(RegisterKind::Holding, 10, None),
            reg(RegisterKind::Coil, 0, None),
            reg(RegisterKind::Coil, 1, None),
        ];
        let reads = plan(&regs);
        let shape: Vec<_> = reads
            .iter()
            .map(|r| (r.kind, r.address, r.count, r.registers.clone()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (RegisterKind::Holding, 0, 4, vec![1, 3, 0]),
                (RegisterKind::Holding, 10, 1, vec![4]),
                (RegisterKind::Input, 1, 1, vec![2]),
                (RegisterKind::Coil, 0, 2, vec![5, 6]),
            ]
        );
        assert_eq!(read_reply_bytes(&reads[0]), 13);
        assert_eq!(read_reply_bytes(&reads[3]), 6);
    }

    #[test]
    fn a_read_stays_within_the_protocol_limit() {
        let regs: Vec<_> = (0..200)
            .map(|a| reg(RegisterKind::Holding, a, None))
            .collect();
        let counts: Vec<u16> = plan(&regs).iter().map(|r| r.count).collect();
        assert_eq!(counts, vec![125, 75]);
    }

    #[test]
    fn timing_follows_the_line() {
        let line = LineTiming {
            baud: 9_600,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
        };
        assert_eq!(line.char_bits(), 10);
        // 3.5 characters of 10 bits at 9,600 baud.
        assert_eq!(line.frame_gap(), Duration::from_nanos(3_645_833));
        assert_eq!(line.bytes_time(96), Duration::from_millis(100));
        let fast = LineTiming {
            baud: 115_200,
            parity: Parity::Even,
            ..line
        };
        assert_eq!(fast.char_bits(), 11);
        assert_eq!(fast.frame_gap(), Duration::from_micros(1_750));
    }
}
