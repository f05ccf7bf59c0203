//! Warp-level matrix instructions: the fragment layouts of `mma.sync.aligned` (m16n8k16
//! and m16n8k8 with f16/bf16 inputs, m16n8k8 and m16n8k4 with tf32) and of
//! `ldmatrix`/`stmatrix` (m8n8, b16, with and without `.trans`), as the PTX ISA's
//! "Matrix Fragments for mma" and "ldmatrix" sections define them. With `g = lane / 4` and
//! `t = lane % 4`, each function maps (lane, register, half) to a matrix element.

use super::ir::{MmaShape, Ty};

/// (row, col) of A-fragment element `i` (register `i / 2`, half `i % 2` for 16-bit inputs;
/// register `i` for tf32) held by `lane`.
pub fn a_elem(shape: MmaShape, ab: Ty, lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    match (shape, ab) {
        (MmaShape::M16n8k16, _) => (g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)),
        (MmaShape::M16n8k8, Ty::Tf32) => (g + 8 * (i & 1), t + 4 * (i >> 1)),
        (MmaShape::M16n8k8, _) => (g + 8 * (i >> 1), 2 * t + (i & 1)),
        (MmaShape::M16n8k4, _) => (g + 8 * i, t),
    }
}

/// (row, col) of B-fragment element `i` (K x N).
pub fn b_elem(shape: MmaShape, ab: Ty, lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    match (shape, ab) {
        (MmaShape::M16n8k16, _) => (2 * t + (i & 1) + 8 * (i >> 1), g),
        (MmaShape::M16n8k8, Ty::Tf32) => (t + 4 * i, g),
        (MmaShape::M16n8k8, _) => (2 * t + i, g),
        (MmaShape::M16n8k4, _) => (t, g),
    }
}

/// (row, col) of C/D-fragment element `i` (0..4): register `i` for f32 accumulators,
/// register `i / 2` half `i % 2` for f16.
pub fn c_elem(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    (g + 8 * (i >> 1), 2 * t + (i & 1))
}

pub fn k_of(shape: MmaShape) -> usize {
    match shape {
        MmaShape::M16n8k16 => 16,
        MmaShape::M16n8k8 => 8,
        MmaShape::M16n8k4 => 4,
    }
}

/// Number of A and B elements per lane.
fn elems(shape: MmaShape) -> (usize, usize) {
    let k = k_of(shape);
    (16 * k / 32, k * 8 / 32)
}

fn input(bits: u64, ab: Ty) -> f64 {
    match ab {
        Ty::Bf16 => half::bf16::from_bits(bits as u16).to_f64(),
        Ty::F16 => half::f16::from_bits(bits as u16).to_f64(),
        // tensor cores read the 19 most significant bits of a tf32 operand
        _ => f32::from_bits((bits as u32) & 0xffff_e000) as f64,
    }
}

/// Element `i` of a fragment held in 32-bit registers `regs`.
fn frag(regs: &[u64], ab: Ty, i: usize) -> u64 {
    if ab == Ty::Tf32 {
        regs[i] & 0xffff_ffff
    } else {
        (regs[i / 2] >> (16 * (i % 2))) & 0xffff
    }
}

/// One warp's fragment registers: up to four 32-bit registers per lane.
pub type Frags = [[u64; 4]; 32];

/// `D = A B + C` for one warp: `a[lane]`, `b[lane]`, `c[lane]` are each lane's fragment
/// registers; returns each lane's D registers. Products are exact and summed in f64, then
/// rounded once to the accumulator type (the manual leaves the accumulation order and
/// rounding unspecified, with at least single precision).
pub fn mma(shape: MmaShape, ab: Ty, acc: Ty, a: &Frags, b: &Frags, c: &Frags) -> Frags {
    let k = k_of(shape);
    let (na, nb) = elems(shape);
    let mut am = [[0f64; 16]; 16];
    let mut bm = [[0f64; 8]; 16];
    let mut cm = [[0f64; 8]; 16];
    for lane in 0..32 {
        for i in 0..na {
            let (r, col) = a_elem(shape, ab, lane, i);
            am[r][col] = input(frag(&a[lane], ab, i), ab);
        }
        for i in 0..nb {
            let (r, col) = b_elem(shape, ab, lane, i);
            bm[r][col] = input(frag(&b[lane], ab, i), ab);
        }
        for i in 0..4 {
            let (r, col) = c_elem(lane, i);
            cm[r][col] = if acc == Ty::F32 {
                f32::from_bits(c[lane][i] as u32) as f64
            } else {
                half::f16::from_bits((c[lane][i / 2] >> (16 * (i % 2))) as u16).to_f64()
            };
        }
    }
    let mut out = [[0u64; 4]; 32];
    for (lane, d) in out.iter_mut().enumerate() {
        for i in 0..4 {
            let (r, col) = c_elem(lane, i);
            let mut s = cm[r][col];
            for (kk, row) in bm.iter().enumerate().take(k) {
                s += am[r][kk] * row[col];
            }
            if acc == Ty::F32 {
                d[i] = (s as f32).to_bits() as u64;
            } else {
                d[i / 2] |= (half::f16::from_f64(s).to_bits() as u64) << (16 * (i % 2));
            }
        }
    }
    out
}

/// The 16-bit element lane `lane` receives in half `h` of its register for one 8x8 matrix
/// `m` (rows as stored at the row addresses) under `ldmatrix` (and gives under
/// `stmatrix`): `(row, col)` of `m`.
pub fn ldmatrix_elem(lane: usize, h: usize, trans: bool) -> (usize, usize) {
    let (q, p) = (lane >> 2, 2 * (lane & 3) + h);
    if trans { (p, q) } else { (q, p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain matrix product in f64.
    fn matmul(a: &[Vec<f64>], b: &[Vec<f64>], c: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let (m, k, n) = (a.len(), b.len(), b[0].len());
        (0..m)
            .map(|i| {
                (0..n)
                    .map(|j| c[i][j] + (0..k).map(|p| a[i][p] * b[p][j]).sum::<f64>())
                    .collect()
            })
            .collect()
    }

    fn check(shape: MmaShape, ab: Ty, acc: Ty) {
        let k = k_of(shape);
        // small integers and halves: exact in every input type
        let av: Vec<Vec<f64>> = (0..16)
            .map(|i| {
                (0..k)
                    .map(|p| ((i * 7 + p * 3) % 11) as f64 * 0.5 - 2.0)
                    .collect()
            })
            .collect();
        let bv: Vec<Vec<f64>> = (0..k)
            .map(|p| (0..8).map(|j| ((p * 5 + j * 2) % 9) as f64 - 4.0).collect())
            .collect();
        let cv: Vec<Vec<f64>> = (0..16)
            .map(|i| (0..8).map(|j| (i + j) as f64 * 0.25).collect())
            .collect();
        let enc = |x: f64| -> u64 {
            match ab {
                Ty::Bf16 => half::bf16::from_f64(x).to_bits() as u64,
                Ty::F16 => half::f16::from_f64(x).to_bits() as u64,
                _ => (x as f32).to_bits() as u64,
            }
        };
        let (na, nb) = elems(shape);
        let pack = |vals: Vec<u64>| -> Vec<u64> {
            if ab == Ty::Tf32 {
                vals
            } else {
                vals.chunks(2).map(|p| p[0] | (p[1] << 16)).collect()
            }
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        for lane in 0..32 {
            a.push(pack(
                (0..na)
                    .map(|i| {
                        let (r, col) = a_elem(shape, ab, lane, i);
                        enc(av[r][col])
                    })
                    .collect(),
            ));
            b.push(pack(
                (0..nb)
                    .map(|i| {
                        let (r, col) = b_elem(shape, ab, lane, i);
                        enc(bv[r][col])
                    })
                    .collect(),
            ));
            let cs: Vec<u64> = (0..4)
                .map(|i| {
                    let (r, col) = c_elem(lane, i);
                    cv[r][col]
                })
                .map(|x| {
                    if acc == Ty::F32 {
                        (x as f32).to_bits() as u64
                    } else {
                        half::f16::from_f64(x).to_bits() as u64
                    }
                })
                .collect();
            c.push(if acc == Ty::F32 {
                cs
            } else {
                cs.chunks(2).map(|p| p[0] | (p[1] << 16)).collect()
            });
        }
        let fr = |v: &Vec<Vec<u64>>| -> Frags {
            let mut f = [[0u64; 4]; 32];
            for (l, regs) in v.iter().enumerate() {
                f[l][..regs.len()].copy_from_slice(regs);
            }
            f
        };
        let d = mma(shape, ab, acc, &fr(&a), &fr(&b), &fr(&c));
        let want = matmul(&av, &bv, &cv);
        let mut seen = [[false; 8]; 16];
        for (lane, dl) in d.iter().enumerate() {
            for i in 0..4 {
                let (r, col) = c_elem(lane, i);
                let got = if acc == Ty::F32 {
                    f32::from_bits(dl[i] as u32) as f64
                } else {
                    half::f16::from_bits((dl[i / 2] >> (16 * (i % 2))) as u16).to_f64()
                };
                assert_eq!(got, want[r][col], "{shape:?} {ab:?} lane {lane} elem {i}");
                seen[r][col] = true;
            }
        }
        assert!(
            seen.iter().all(|r| r.iter().all(|&x| x)),
            "D covers the 16x8 tile"
        );
    }

    #[test]
    fn mma_fragments_compute_the_plain_matrix_product() {
        check(MmaShape::M16n8k16, Ty::Bf16, Ty::F32);
        check(MmaShape::M16n8k16, Ty::F16, Ty::F32);
        check(MmaShape::M16n8k16, Ty::F16, Ty::F16);
        check(MmaShape::M16n8k8, Ty::Bf16, Ty::F32);
        check(MmaShape::M16n8k8, Ty::F16, Ty::F32);
        check(MmaShape::M16n8k8, Ty::Tf32, Ty::F32);
        check(MmaShape::M16n8k4, Ty::Tf32, Ty::F32);
    }

    #[test]
    fn fragments_match_the_manuals_worked_lanes() {
        // lane 31 of m16n8k16: A a0..a7, B b0..b3 (from the PTX ISA fragment tables)
        let a: Vec<_> = (0..8)
            .map(|i| a_elem(MmaShape::M16n8k16, Ty::Bf16, 31, i))
            .collect();
        assert_eq!(
            a,
            [
                (7, 6),
                (7, 7),
                (15, 6),
                (15, 7),
                (7, 14),
                (7, 15),
                (15, 14),
                (15, 15)
            ]
        );
        let b: Vec<_> = (0..4)
            .map(|i| b_elem(MmaShape::M16n8k16, Ty::Bf16, 31, i))
            .collect();
        assert_eq!(b, [(6, 7), (7, 7), (14, 7), (15, 7)]);
        // tf32 m16n8k8: a1 is the row + 8 element
        assert_eq!(a_elem(MmaShape::M16n8k8, Ty::Tf32, 5, 1), (9, 1));
        assert_eq!(ldmatrix_elem(6, 1, false), (1, 5));
        assert_eq!(ldmatrix_elem(6, 1, true), (5, 1));
    }
}
