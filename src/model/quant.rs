//! GGML tensor types and their dequantisation to f32 (block layouts as in ggml's
//! `ggml-common.h`; every block stores its scale(s) as f16 followed by packed quants).

use half::f16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes taken by `n` elements: `Err` names why there is no such size (`n` is not a
    /// whole number of blocks, or its bytes overflow a `usize`: a corrupt header's dims can
    /// multiply to 2^63 elements, whose 2^65 bytes would wrap to 0 unchecked).
    pub fn byte_size(self, n: usize) -> Result<usize, String> {
        let (elems, bytes) = self.block();
        if !n.is_multiple_of(elems) {
            return Err(format!("{n} elements of {self:?} are not whole blocks"));
        }
        (n / elems).checked_mul(bytes).ok_or_else(|| {
            format!("{n} elements of {self:?} take more bytes than can be addressed")
        })
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantise `data` (exactly `ty.byte_size(out.len())` bytes) into `out`.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (elems, bytes) = ty.block();
    for (blk, y) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(elems)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::F16 => y[0] = h(blk, 0),
            GgmlType::BF16 => y[0] = half::bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q8_0 => {
                let d = h(blk, 0);
                for (yi, &q) in y.iter_mut().zip(&blk[2..34]) {
                    *yi = d * (q as i8) as f32;
                }
            }
            GgmlType::Q4_0 => {
                let d = h(blk, 0);
                for (j, &q) in blk[2..18].iter().enumerate() {
                    y[j] = d * ((q & 0xf) as i32 - 8) as f32;
                    y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (h(blk, 0), h(blk, 2));
                for (j, &q) in blk[4..20].iter().enumerate() {
                    y[j] = d * (q & 0xf) as f32 + m;
                    y[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
            GgmlType::Q4K => dequant_q4k(blk, y),
            GgmlType::Q6K => dequant_q6k(blk, y),
        }
    }
}

/// `rows` rows of `cols` values of random blocks of the quantised type `ty`, for tests and
/// benches: random quants (and K types' 6-bit or 8-bit scales), and the f16 scales between
/// 2^-8 and 2^-4, so that every value is finite and normal.
pub fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (elems, size) = ty.block();
    let mut bytes: Vec<u8> = (0..rows * cols / elems * size)
        .map(|_| rng.random())
        .collect();
    let scales: &[usize] = match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4K => &[0, 2],
        GgmlType::Q6K => &[208],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => panic!("{ty:?} is not quantised"),
    };
    for blk in bytes.chunks_exact_mut(size) {
        for &at in scales {
            let s = f16::from_f32(rng.random_range(2f32.powi(-8)..2f32.powi(-4)));
            blk[at..at + 2].copy_from_slice(&s.to_le_bytes());
        }
    }
    bytes
}

/// A matrix `W (rows, cols)` in the compact form its file stores it, kept beside its f32
/// values so that a product reading few rows can read these bytes instead (a Q4_1 weight
/// is 5/32 the bytes). Each row is whole blocks of `ty`, rows in the order of the f32
/// matrix (GGUF's Q/K row permutation already undone). Its values are what [`dequantize`]
/// makes of it: the f32 matrix's, bit for bit.
pub struct StoredMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

impl StoredMatrix {
    /// `None` when `ty` is not smaller than f32 or the bytes are not `rows` rows of whole
    /// blocks (a row of 576 values cannot be Q4_K's 256-value blocks).
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Option<Self> {
        let (elems, size) = ty.block();
        let whole = ty != GgmlType::F32
            && cols.is_multiple_of(elems)
            && (cols / elems).checked_mul(size)?.checked_mul(rows)? == bytes.len();
        whole.then_some(StoredMatrix {
            ty,
            rows,
            cols,
            bytes,
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The bytes kept.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// The type of its blocks.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }

    /// The bytes of rows `r0..r1`.
    pub fn rows(&self, r0: usize, r1: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes[r0 * rb..r1 * rb]
    }
}

/// 6-bit scale and min `j` (0..8) of a Q4_K super-block's packed 12-byte scale array.
pub(crate) fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit quants;
/// 8 sub-blocks of 32 with `x = d*sc*q - dmin*m`.
fn dequant_q4k(blk: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(blk, 0), h(blk, 2));
    let scales = &blk[4..16];
    let qs = &blk[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = q4k_scale_min(2 * chunk, scales);
        let (sc2, m2) = q4k_scale_min(2 * chunk + 1, scales);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d * sc1 as f32 * (q[l] & 0xf) as f32 - dmin * m1 as f32;
            out[l + 32] = d * sc2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
        }
    }
}

/// Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d;
/// 16 sub-blocks of 16 with `x = d*sc*(q - 32)`.
fn dequant_q6k(blk: &[u8], y: &mut [f32]) {
    let d = h(blk, 208);
    for half_blk in 0..2 {
        let ql = &blk[half_blk * 64..half_blk * 64 + 64];
        let qh = &blk[128 + half_blk * 32..128 + half_blk * 32 + 32];
        let sc = &blk[192 + half_blk * 8..192 + half_blk * 8 + 8];
        let out = &mut y[half_blk * 128..half_blk * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
