//! A fixed 64-bit hash of a model's bytes, for telling models apart in curvature files.
//! Not cryptographic: it guards against using a file with the wrong model by mistake. Its
//! definition is part of the file format, so it is written out here rather than taken from
//! `std` (whose hasher may change between Rust releases).

const PRIME: u64 = 0x0000_0100_0000_01b3;
const SEED: u64 = 0xcbf2_9ce4_8422_2325;
/// Independent lanes over 32-byte blocks: four multiply chains run in parallel in the CPU,
/// several GB/s on one core (the model's weights are read once anyway).
const LANES: usize = 4;

pub struct Fingerprint {
    lanes: [u64; LANES],
    bytes: u64,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint {
            lanes: [SEED, SEED ^ 1, SEED ^ 2, SEED ^ 3],
            bytes: 0,
        }
    }
}

fn mix(h: u64, word: u64) -> u64 {
    (h ^ word).wrapping_mul(PRIME).rotate_left(31)
}

impl Fingerprint {
    /// Add one part (a file, a serialised configuration); its length is hashed too, so
    /// moving bytes between parts changes the result.
    pub fn add(&mut self, part: &[u8]) {
        let mut blocks = part.chunks_exact(8 * LANES);
        for block in &mut blocks {
            for (lane, word) in self.lanes.iter_mut().zip(block.chunks_exact(8)) {
                let mut w = [0u8; 8];
                w.copy_from_slice(word);
                *lane = mix(*lane, u64::from_le_bytes(w));
            }
        }
        for &b in blocks.remainder() {
            self.lanes[0] = mix(self.lanes[0], b as u64);
        }
        self.lanes[1] = mix(self.lanes[1], part.len() as u64);
        self.bytes += part.len() as u64;
    }

    /// Total bytes added.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn finish(&self) -> u64 {
        self.lanes.iter().fold(SEED, |h, &l| mix(h, l))
    }
}
