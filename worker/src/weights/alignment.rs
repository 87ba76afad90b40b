//! `general.alignment` read from a GGUF header ahead of candle's parser, which rounds
//! the tensor data's start up to it and panics dividing by 0 (candle-core 0.11.1).
//! A walk over the metadata's keys and values, skipping each by its type.

/// The `general.alignment` a GGUF header declares (the last one, as candle keeps it),
/// when of an integer type candle reads; `None` when there is none or the header is
/// malformed (candle's parser then says why).
pub(super) fn declared_alignment(bytes: &[u8]) -> Option<u64> {
    let mut r = HeaderReader {
        bytes,
        at: 4,
        wide: true,
    };
    r.wide = r.u32()? >= 2;
    let _tensors = r.length()?;
    let entries = r.length()?;
    let mut alignment = None;
    // Every entry takes at least 9 bytes, so a damaged count stops at the end.
    for _ in 0..entries {
        let key = r.string()?;
        let kind = r.u32()?;
        if key == b"general.alignment" {
            alignment = r.alignment_value(kind);
        }
        r.skip_value(kind, 0)?;
    }
    alignment
}

/// A cursor over a GGUF header's metadata: little-endian numbers, lengths of 64
/// bits (32 in version 1).
struct HeaderReader<'a> {
    bytes: &'a [u8],
    at: usize,
    wide: bool,
}

impl<'a> HeaderReader<'a> {
    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let end = self.at.checked_add(usize::try_from(n).ok()?)?;
        let bytes: &'a [u8] = self.bytes;
        let taken = bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn length(&mut self) -> Option<u64> {
        match self.wide {
            true => Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            false => self.u32().map(u64::from),
        }
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.length()?;
        self.take(len)
    }

    /// The value about to be read, as candle reads an alignment: unsigned
    /// integers of up to 32 bits, and signed ones when not negative.
    fn alignment_value(&self, kind: u32) -> Option<u64> {
        let at = |n: usize| self.bytes.get(self.at..self.at.checked_add(n)?);
        match kind {
            0 => at(1).map(|b| u64::from(b[0])),
            1 => at(1).and_then(|b| u64::try_from(b[0] as i8).ok()),
            2 => at(2).map(|b| u64::from(u16::from_le_bytes([b[0], b[1]]))),
            3 => at(2).and_then(|b| u64::try_from(i16::from_le_bytes([b[0], b[1]])).ok()),
            4 => at(4).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            5 => {
                at(4).and_then(|b| u64::try_from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok())
            }
            _ => None,
        }
    }

    fn skip_value(&mut self, kind: u32, depth: usize) -> Option<()> {
        match (kind, fixed_size(kind)) {
            (_, Some(size)) => self.take(size).map(drop),
            // A string.
            (8, None) => self.string().map(drop),
            // An array: element type and count, then the elements.
            (9, None) if depth < MAX_ARRAY_DEPTH => {
                let element = self.u32()?;
                let count = self.length()?;
                match fixed_size(element) {
                    Some(size) => self.take(count.checked_mul(size)?).map(drop),
                    // Each element takes at least 4 bytes: a damaged count stops at the end.
                    None => (0..count).try_for_each(|_| self.skip_value(element, depth + 1)),
                }
            }
            _ => None,
        }
    }
}

/// Nested arrays candle reads (its limit).
const MAX_ARRAY_DEPTH: usize = 64;

/// Bytes of a GGUF value of fixed size, by its type number.
fn fixed_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}
