//! The cuBLAS twin: `cublasGemmEx` / `cublasGemmStridedBatchedEx` with cuBLAS's
//! column-major semantics and argument validation (CUBLAS_STATUS_INVALID_VALUE cases of
//! the cuBLAS documentation), f32 or bf16 inputs (bf16 read as the GPU reads it), an f32
//! output, or a bf16 one for bf16 inputs (`alpha AB + beta C` formed in f32, then rounded
//! once to nearest even), f32 accumulation (fused multiply-adds in k order), `beta == 0`
//! writing C without reading it. Operands are checked like kernel accesses: each must lie in a
//! live allocation and every element read must have been written.

use rayon::prelude::*;

use super::device::{Device, SimError};
use super::memory::Alloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trans {
    N,
    T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// A column-major matrix operand: pointer, element type, leading dimension, and the
/// element stride between consecutive batch entries.
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    pub ptr: u64,
    pub ty: DType,
    pub ld: i64,
    pub stride: i64,
}

/// `C_i = alpha op(A_i) op(B_i) + beta C_i` for `i < batch` (column-major, C is m x n).
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub ta: Trans,
    pub tb: Trans,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub alpha: f32,
    pub a: Mat,
    pub b: Mat,
    pub beta: f32,
    pub c: Mat,
    pub batch: i64,
}

fn invalid(what: &str, msg: String) -> SimError {
    SimError::Api(format!("{what}: CUBLAS_STATUS_INVALID_VALUE: {msg}"))
}

impl Gemm {
    fn name(&self) -> &'static str {
        if self.batch == 1 {
            "cublasGemmEx"
        } else {
            "cublasGemmStridedBatchedEx"
        }
    }

    /// The checks cuBLAS makes before doing anything, and one it cannot make: every size
    /// fits its 32-bit `int` parameters (the driver narrows them; one past `i32::MAX`
    /// would reach cuBLAS as another, valid-looking number).
    pub fn validate(&self) -> Result<(), SimError> {
        let w = self.name();
        if self.m < 0 || self.n < 0 || self.k < 0 {
            return Err(invalid(
                w,
                format!("m={} n={} k={}", self.m, self.n, self.k),
            ));
        }
        if self.batch < 0 {
            return Err(invalid(w, format!("batchCount {}", self.batch)));
        }
        let sizes = [
            ("m", self.m),
            ("n", self.n),
            ("k", self.k),
            ("lda", self.a.ld),
            ("ldb", self.b.ld),
            ("ldc", self.c.ld),
            ("batchCount", self.batch),
        ];
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v > i32::MAX as i64) {
            return Err(invalid(
                w,
                format!("{name}={v} does not fit cuBLAS's 32-bit int"),
            ));
        }
        let rows_a = if self.ta == Trans::N { self.m } else { self.k };
        let rows_b = if self.tb == Trans::N { self.k } else { self.n };
        if self.a.ld < rows_a.max(1) {
            return Err(invalid(w, format!("lda {} < max(1, {rows_a})", self.a.ld)));
        }
        if self.b.ld < rows_b.max(1) {
            return Err(invalid(w, format!("ldb {} < max(1, {rows_b})", self.b.ld)));
        }
        if self.c.ld < self.m.max(1) {
            return Err(invalid(
                w,
                format!("ldc {} < max(1, {})", self.c.ld, self.m),
            ));
        }
        let supported =
            self.a.ty == self.b.ty && (self.c.ty == DType::F32 || self.a.ty == DType::Bf16);
        if !supported {
            return Err(SimError::Api(format!(
                "{w}: CUBLAS_STATUS_NOT_SUPPORTED: A {:?}, B {:?}, C {:?} with CUBLAS_COMPUTE_32F (supported: f32/f32/f32, bf16/bf16/f32, bf16/bf16/bf16)",
                self.a.ty, self.b.ty, self.c.ty
            )));
        }
        Ok(())
    }
}

/// The bytes a column-major `rows x cols` operand with leading dimension `ld` spans.
fn span(rows: i64, cols: i64, ld: i64, size: u64) -> u64 {
    if rows == 0 || cols == 0 {
        0
    } else {
        ((cols - 1) * ld + rows) as u64 * size
    }
}

/// The k-slice of a GEMM one accumulator covers before its partial sum is added to the
/// total (as GPU GEMM kernels split k across warps or blocks and reduce the slices).
const SLICE: usize = 256;

/// Eight dot products `a . panel[:, t]`, computed side by side: within each k-slice a
/// chain of fused multiply-adds in k order (as one GPU thread accumulates), the slices'
/// partial sums added in order. Accumulating a long k (a 49k-token vocabulary) in one
/// chain would lose far more than a GPU does.
fn dot8(a: &[f32], panel: &[f32]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above).
        return unsafe { dot8_fma(a, panel) };
    }
    dot8_plain(a, panel)
}

#[inline(always)]
fn dot8_plain(a: &[f32], panel: &[f32]) -> [f32; 8] {
    let mut total = [0f32; 8];
    for (s, chunk) in a.chunks(SLICE).enumerate() {
        let mut acc = [0f32; 8];
        for (i, &x) in chunk.iter().enumerate() {
            let p = s * SLICE + i;
            let row = &panel[p * 8..p * 8 + 8];
            for t in 0..8 {
                acc[t] = x.mul_add(row[t], acc[t]);
            }
        }
        for t in 0..8 {
            total[t] += acc[t];
        }
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot8_fma(a: &[f32], panel: &[f32]) -> [f32; 8] {
    dot8_plain(a, panel)
}

/// A whole operand read to the host as f32 (bf16 widened), in its column-major storage.
fn read_all(op: &Option<Operand>, mat: &Mat, rows: i64, cols: i64) -> Vec<f32> {
    let Some(op) = op else { return Vec::new() };
    let n = span(rows, cols, mat.ld, 1) as usize;
    let mut bytes = vec![0u8; n * mat.ty.size() as usize];
    op.alloc.read(op.off, &mut bytes);
    match mat.ty {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

struct Operand<'h> {
    alloc: &'h Alloc,
    off: usize,
}

impl Device {
    /// Run a GEMM on the simulated device.
    pub fn gemm(&self, g: &Gemm) -> Result<(), SimError> {
        g.validate()?;
        let w = g.name();
        if g.m == 0 || g.n == 0 || g.batch == 0 || ((g.alpha == 0.0 || g.k == 0) && g.beta == 1.0) {
            return Ok(());
        }
        let heap = self.heap_for_blas();
        // With alpha = 0, A and B are not referenced (reference BLAS): C = beta C, as for
        // k = 0, whatever A and B hold.
        let k = if g.alpha == 0.0 { 0 } else { g.k };
        let (ra, ca) = if g.ta == Trans::N { (g.m, k) } else { (k, g.m) };
        let (rb, cb) = if g.tb == Trans::N { (k, g.n) } else { (g.n, k) };
        let initcheck = self.checks().initcheck;
        let locate = |name: &str,
                      mat: &Mat,
                      rows: i64,
                      cols: i64,
                      i: i64,
                      read: bool|
         -> Result<Option<Operand<'_>>, SimError> {
            let bytes = span(rows, cols, mat.ld, mat.ty.size());
            if bytes == 0 {
                return Ok(None);
            }
            let ptr = mat
                .ptr
                .wrapping_add((i * mat.stride) as u64 * mat.ty.size());
            let (alloc, off) = heap.range(ptr, bytes as usize).map_err(|e| {
                SimError::Api(format!(
                    "memcheck: {w}: operand {name} of batch entry {i}: {e}"
                ))
            })?;
            if read && initcheck {
                let size = mat.ty.size() as usize;
                for c in 0..cols as usize {
                    let start = off + c * mat.ld as usize * size;
                    if let Some(b) = alloc.first_uninit(start, rows as usize * size) {
                        return Err(SimError::Api(format!(
                            "initcheck: {w}: operand {name} of batch entry {i} reads never-written byte {b} of {}",
                            alloc.describe()
                        )));
                    }
                }
            }
            Ok(Some(Operand { alloc, off }))
        };
        for i in 0..g.batch {
            let a = locate("A", &g.a, ra, ca, i, true)?;
            let b = locate("B", &g.b, rb, cb, i, true)?;
            let c = locate("C", &g.c, g.m, g.n, i, g.beta != 0.0)?;
            let c = c.ok_or_else(|| invalid(w, "C is empty".into()))?;
            let (m, n, k) = (g.m as usize, g.n as usize, k as usize);
            // op(A) as m x k row-major; op(B) as column blocks of 8, each k x 8 (so eight
            // outputs accumulate side by side, each in k order).
            let av = read_all(&a, &g.a, ra, ca);
            let bv = read_all(&b, &g.b, rb, cb);
            let mut am = vec![0f32; m * k];
            for r in 0..m {
                for p in 0..k {
                    let (row, col) = if g.ta == Trans::N { (r, p) } else { (p, r) };
                    am[r * k + p] = av[row + col * g.a.ld as usize];
                }
            }
            let nb = n.div_ceil(8);
            let mut bp = vec![0f32; nb * k * 8];
            for j in 0..n {
                for p in 0..k {
                    let (row, col) = if g.tb == Trans::N { (p, j) } else { (j, p) };
                    bp[(j / 8) * k * 8 + p * 8 + j % 8] = bv[row + col * g.b.ld as usize];
                }
            }
            let (alpha, beta, ldc, cty) = (g.alpha, g.beta, g.c.ld as usize, g.c.ty);
            let size = cty.size() as u32;
            self.pool().install(|| {
                (0..nb).into_par_iter().for_each(|jb| {
                    let panel = &bp[jb * k * 8..(jb + 1) * k * 8];
                    for r in 0..m {
                        let acc = dot8(&am[r * k..(r + 1) * k], panel);
                        for (t, &s) in acc.iter().enumerate().take((n - jb * 8).min(8)) {
                            let at = c.off + (r + (jb * 8 + t) * ldc) * size as usize;
                            let v = if beta == 0.0 {
                                alpha * s
                            } else {
                                let old = c.alloc.load(at, size);
                                let old = match cty {
                                    DType::F32 => f32::from_bits(old as u32),
                                    DType::Bf16 => half::bf16::from_bits(old as u16).to_f32(),
                                };
                                alpha.mul_add(s, beta * old)
                            };
                            let bits = match cty {
                                DType::F32 => v.to_bits() as u64,
                                DType::Bf16 => half::bf16::from_f32(v).to_bits() as u64,
                            };
                            c.alloc.store(at, size, bits);
                        }
                    }
                })
            });
        }
        for a in heap.live() {
            a.refresh_all_init();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptxsim::fault::Checks;

    fn dev() -> Device {
        Device::new(Checks::default(), 1 << 26, 2).unwrap()
    }

    fn upload(d: &Device, v: &[f32]) -> u64 {
        let p = d.alloc(v.len() * 4, false).unwrap();
        d.htod(p, bytemuck::cast_slice(v)).unwrap();
        p
    }

    fn download(d: &Device, p: u64, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        d.dtoh(bytemuck::cast_slice_mut(&mut out), p).unwrap();
        out
    }

    #[test]
    fn column_major_products_with_transposes_and_batches() {
        let d = dev();
        // row-major A (2x3), B (3x2): C = A B (2x2) issued as column-major C^T = B^T A^T
        let a = [1f32, 2., 3., 4., 5., 6.];
        let b = [7f32, 8., 9., 10., 11., 12.];
        let (pa, pb) = (upload(&d, &a), upload(&d, &b));
        let pc = d.alloc(16, false).unwrap();
        let mat = |ptr, ld| Mat {
            ptr,
            ty: DType::F32,
            ld,
            stride: 0,
        };
        d.gemm(&Gemm {
            ta: Trans::N,
            tb: Trans::N,
            m: 2,
            n: 2,
            k: 3,
            alpha: 1.0,
            a: mat(pb, 2),
            b: mat(pa, 3),
            beta: 0.0,
            c: mat(pc, 2),
            batch: 1,
        })
        .unwrap();
        assert_eq!(download(&d, pc, 4), [58., 64., 139., 154.]);
        // transposed operands give the transpose: C^T = A B computed as (B^T A^T)^T
        d.gemm(&Gemm {
            ta: Trans::T,
            tb: Trans::T,
            m: 2,
            n: 2,
            k: 3,
            alpha: 2.0,
            a: mat(pa, 3),
            b: mat(pb, 2),
            beta: 1.0,
            c: mat(pc, 2),
            batch: 1,
        })
        .unwrap();
        assert_eq!(
            download(&d, pc, 4),
            [58. * 3., 64. + 2. * 139., 139. + 2. * 64., 154. * 3.]
        );
        // two batch entries of 1x1 products with strides
        let pc2 = d.alloc(8, false).unwrap();
        d.gemm(&Gemm {
            ta: Trans::N,
            tb: Trans::N,
            m: 1,
            n: 1,
            k: 1,
            alpha: 1.0,
            a: Mat {
                stride: 1,
                ..mat(pa, 1)
            },
            b: Mat {
                stride: 2,
                ..mat(pb, 1)
            },
            beta: 0.0,
            c: Mat {
                stride: 1,
                ..mat(pc2, 1)
            },
            batch: 2,
        })
        .unwrap();
        assert_eq!(download(&d, pc2, 2), [7., 2. * 9.]);
    }

    #[test]
    fn invalid_arguments_and_bad_operands_are_refused() {
        let d = dev();
        let p = upload(&d, &[1.0; 6]);
        let mat = |ptr, ld| Mat {
            ptr,
            ty: DType::F32,
            ld,
            stride: 0,
        };
        let g = Gemm {
            ta: Trans::N,
            tb: Trans::N,
            m: 3,
            n: 2,
            k: 1,
            alpha: 1.0,
            a: mat(p, 2),
            b: mat(p, 1),
            beta: 0.0,
            c: mat(p, 3),
            batch: 1,
        };
        let e = d.gemm(&g).unwrap_err().to_string();
        assert!(e.contains("lda 2 < max(1, 3)"), "{e}");
        let e = d
            .gemm(&Gemm {
                a: mat(p, 3),
                c: mat(p, 2),
                ..g
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("ldc 2"), "{e}");
        // C spans 3 x 3 floats: past the end of the 6-float allocation
        let e = d
            .gemm(&Gemm {
                a: mat(p, 3),
                n: 3,
                b: mat(p, 1),
                ..g
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("memcheck") && e.contains("operand C"), "{e}");
        // never-written input
        let q = d.alloc(24, false).unwrap();
        let e = d.gemm(&Gemm { a: mat(q, 3), ..g }).unwrap_err().to_string();
        assert!(e.contains("initcheck") && e.contains("operand A"), "{e}");
        // bf16 inputs are rounded as the GPU sees them
        let x = half::bf16::from_f32(1.0 / 3.0);
        let pb = d.alloc(2, false).unwrap();
        d.htod(pb, &x.to_bits().to_le_bytes()).unwrap();
        let pc = d.alloc(4, false).unwrap();
        let bm = Mat {
            ptr: pb,
            ty: DType::Bf16,
            ld: 1,
            stride: 0,
        };
        d.gemm(&Gemm {
            ta: Trans::N,
            tb: Trans::N,
            m: 1,
            n: 1,
            k: 1,
            alpha: 1.0,
            a: bm,
            b: bm,
            beta: 0.0,
            c: mat(pc, 1),
            batch: 1,
        })
        .unwrap();
        assert_eq!(download(&d, pc, 1)[0], x.to_f32() * x.to_f32());
        // f32 inputs cannot write a bf16 C (cuBLAS: not supported)
        let e = d
            .gemm(&Gemm {
                a: mat(p, 3),
                c: Mat {
                    ty: DType::Bf16,
                    ..mat(p, 3)
                },
                ..g
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("CUBLAS_STATUS_NOT_SUPPORTED"), "{e}");
    }

    /// A bf16 C: `alpha AB + beta C` formed in f32 from the bf16 C as stored, rounded once
    /// to nearest even (the `half` crate's rounding), and written as two bytes (the next
    /// element is left alone).
    #[test]
    fn a_bf16_output_is_rounded_once_after_adding_c() {
        let d = dev();
        let bf = |v: f32| half::bf16::from_f32(v);
        let (a, b) = ([bf(1.0 / 3.0), bf(0.7)], [bf(5.0 / 7.0), bf(-0.3)]);
        let up16 = |v: &[half::bf16]| {
            let p = d.alloc(v.len() * 2, false).unwrap();
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
            d.htod(p, &bytes).unwrap();
            p
        };
        let c0 = bf(1.1);
        let (pa, pb, pc) = (up16(&a), up16(&b), up16(&[c0, bf(9.0)]));
        let mat = |ptr, ld| Mat {
            ptr,
            ty: DType::Bf16,
            ld,
            stride: 0,
        };
        // row vector (1 x 2) times column vector (2 x 1)
        d.gemm(&Gemm {
            ta: Trans::N,
            tb: Trans::N,
            m: 1,
            n: 1,
            k: 2,
            alpha: 2.0,
            a: mat(pa, 1),
            b: mat(pb, 2),
            beta: 1.0,
            c: mat(pc, 1),
            batch: 1,
        })
        .unwrap();
        let dot = a[1]
            .to_f32()
            .mul_add(b[1].to_f32(), a[0].to_f32() * b[0].to_f32());
        let exact = 2f32.mul_add(dot, c0.to_f32());
        let mut got = [0u8; 4];
        d.dtoh(&mut got, pc).unwrap();
        let got = [
            half::bf16::from_le_bytes([got[0], got[1]]),
            half::bf16::from_le_bytes([got[2], got[3]]),
        ];
        assert_eq!(got[0], bf(exact), "{} against {exact}", got[0]);
        assert_ne!(got[0].to_f32(), exact, "the case must need rounding");
        assert_eq!(got[1], bf(9.0), "the element after C is untouched");
    }
}
