//! The verifiable byte stream: a 16-byte header (magic + seed), then bytes derived from the seed and the offset alone.
//!
//! Any byte at any offset can be recomputed, so a reader checks everything it receives without
//! keeping the stream, and corruption, reordering or truncation are caught at the exact offset.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

/// Marks a sluice-stress stream; a sink that sees it verifies the rest.
pub const MAGIC: [u8; 8] = *b"SLSTRM01";
/// Magic (8 bytes) + seed (8 bytes, little endian).
pub const HEADER_LEN: u64 = 16;
/// Verification works in slices of this size so the scratch buffer stays small.
const CHECK_CHUNK: usize = 64 * 1024;

/// One stream's generator, identified by its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    seed: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern { seed }
    }

    /// A fresh seed: different per call and per process run.
    pub fn random() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Pattern::new(RandomState::new().hash_one(n))
    }

    /// Writes the stream's bytes `offset .. offset + buf.len()` (header included) into `buf`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && offset + (i as u64) < HEADER_LEN {
            buf[i] = self.header_byte(offset + i as u64);
            i += 1;
        }
        if i == buf.len() {
            return;
        }
        let mut p = offset + i as u64 - HEADER_LEN;
        while i < buf.len() && !p.is_multiple_of(8) {
            buf[i] = self.body_byte(p);
            i += 1;
            p += 1;
        }
        let mut words = buf[i..].chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&word(self.seed, p / 8).to_le_bytes());
            p += 8;
        }
        for b in words.into_remainder() {
            *b = self.body_byte(p);
            p += 1;
        }
    }

    fn header_byte(&self, offset: u64) -> u8 {
        let o = offset as usize;
        if o < MAGIC.len() {
            MAGIC[o]
        } else {
            self.seed.to_le_bytes()[o - MAGIC.len()]
        }
    }

    fn body_byte(&self, p: u64) -> u8 {
        word(self.seed, p / 8).to_le_bytes()[(p % 8) as usize]
    }
}

/// splitmix64 of (seed, word index): fast, and every word differs from its neighbours.
pub fn word(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Why a stream failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The first 8 bytes were not [`MAGIC`]: not a sluice-stress stream, or corrupted at the start.
    BadMagic,
    /// A byte differed from the pattern.
    Mismatch { offset: u64, expected: u8, got: u8 },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::BadMagic => {
                write!(f, "stream does not start with the sluice-stress header")
            }
            VerifyError::Mismatch {
                offset,
                expected,
                got,
            } => write!(
                f,
                "corrupt byte at offset {offset}: expected {expected:#04x}, got {got:#04x}"
            ),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Checks a stream as it arrives, in pieces of any size.
#[derive(Debug)]
pub struct Verifier {
    /// Known up front (echo: we sent it) or learned from the header.
    pattern: Option<Pattern>,
    /// Header bytes seen so far, until the seed is known.
    header: Vec<u8>,
    /// Stream offset of the next byte.
    offset: u64,
    /// Expected bytes, regenerated per piece.
    scratch: Vec<u8>,
}

impl Verifier {
    /// Learns the seed from the stream's header.
    pub fn new() -> Self {
        Verifier {
            pattern: None,
            header: Vec::with_capacity(HEADER_LEN as usize),
            offset: 0,
            scratch: Vec::new(),
        }
    }

    /// Expects exactly `pattern`'s stream (an echo of what we sent).
    pub fn expecting(pattern: Pattern) -> Self {
        Verifier {
            pattern: Some(pattern),
            ..Verifier::new()
        }
    }

    /// Bytes checked so far (the stream offset).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Checks the next piece of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), VerifyError> {
        if self.pattern.is_none() {
            let need = HEADER_LEN as usize - self.header.len();
            let take = need.min(data.len());
            self.header.extend_from_slice(&data[..take]);
            let magic_seen = self.header.len().min(MAGIC.len());
            if self.header[..magic_seen] != MAGIC[..magic_seen] {
                return Err(VerifyError::BadMagic);
            }
            if self.header.len() < HEADER_LEN as usize {
                self.offset += take as u64;
                return Ok(());
            }
            let seed = u64::from_le_bytes(self.header[8..16].try_into().expect("8 bytes"));
            self.pattern = Some(Pattern::new(seed));
            self.offset += take as u64;
            data = &data[take..];
        }
        let pattern = self.pattern.expect("set above");
        for piece in data.chunks(CHECK_CHUNK) {
            self.scratch.resize(piece.len(), 0);
            pattern.fill(self.offset, &mut self.scratch);
            if piece != &self.scratch[..] {
                let at = piece
                    .iter()
                    .zip(&self.scratch)
                    .position(|(a, b)| a != b)
                    .expect("slices differ");
                return Err(VerifyError::Mismatch {
                    offset: self.offset + at as u64,
                    expected: self.scratch[at],
                    got: piece[at],
                });
            }
            self.offset += piece.len() as u64;
        }
        Ok(())
    }
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(p: Pattern, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        p.fill(0, &mut v);
        v
    }

    #[test]
    fn fill_at_any_offset_matches_the_whole_stream() {
        let p = Pattern::new(42);
        let whole = stream(p, 1000);
        assert_eq!(&whole[..8], &MAGIC);
        for start in [0usize, 1, 7, 15, 16, 17, 23, 24, 500] {
            for len in [0usize, 1, 5, 8, 9, 100] {
                let mut piece = vec![0; len];
                p.fill(start as u64, &mut piece);
                assert_eq!(piece, whole[start..start + len], "start {start} len {len}");
            }
        }
        assert_ne!(stream(Pattern::new(43), 1000)[16..], whole[16..]);
    }

    #[test]
    fn verifier_accepts_the_stream_in_any_pieces_and_finds_corruption() {
        let p = Pattern::random();
        let data = stream(p, 200_000);
        let mut v = Verifier::new();
        let mut rest = &data[..];
        let mut size = 1;
        while !rest.is_empty() {
            let n = size.min(rest.len());
            v.feed(&rest[..n]).unwrap();
            rest = &rest[n..];
            size = size * 3 + 1;
        }
        assert_eq!(v.offset(), 200_000);

        let mut bad = data.clone();
        bad[123_457] ^= 1;
        let err = Verifier::expecting(p).feed(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Mismatch {
                    offset: 123_457,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            Verifier::new().feed(b"GET / HTTP/1.0"),
            Err(VerifyError::BadMagic)
        );
    }
}
