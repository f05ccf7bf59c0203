//! 8. The cuBLAS twin (cuBLAS docs 2.7.1 gemm, 2.8.12 GemmEx, 2.8.14 GemmStridedBatchedEx)

use super::*;

/// Column-major `C = alpha op(A) op(B) + beta C` over a batch, in f64.
#[allow(clippy::too_many_arguments)]
fn gemm_ref(g: &Gemm, a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
    let mut out = c.to_vec();
    for i in 0..g.batch as usize {
        let (ao, bo, co) = (
            i * g.a.stride as usize,
            i * g.b.stride as usize,
            i * g.c.stride as usize,
        );
        for col in 0..g.n as usize {
            for row in 0..g.m as usize {
                let mut s = 0.0;
                for p in 0..g.k as usize {
                    let x = if g.ta == Trans::N {
                        a[ao + row + p * g.a.ld as usize]
                    } else {
                        a[ao + p + row * g.a.ld as usize]
                    };
                    let y = if g.tb == Trans::N {
                        b[bo + p + col * g.b.ld as usize]
                    } else {
                        b[bo + col + p * g.b.ld as usize]
                    };
                    s += x * y;
                }
                let at = co + row + col * g.c.ld as usize;
                out[at] = g.alpha as f64 * s
                    + if g.beta == 0.0 {
                        0.0
                    } else {
                        g.beta as f64 * c[at]
                    };
            }
        }
    }
    out
}

fn mat(ptr: u64, ty: DType, ld: i64, stride: i64) -> Mat {
    Mat {
        ptr,
        ty,
        ld,
        stride,
    }
}

#[test]
fn gemm_transposes_leading_dimensions_and_strided_batches() {
    let (m, n, k, batch) = (5i64, 7i64, 9i64, 3i64);
    let mut rng = Lcg(41);
    for ta in [Trans::N, Trans::T] {
        for tb in [Trans::N, Trans::T] {
            for ty in [DType::F32, DType::Bf16] {
                let (ra, ca) = if ta == Trans::N { (m, k) } else { (k, m) };
                let (rb, cb) = if tb == Trans::N { (k, n) } else { (n, k) };
                let (lda, ldb, ldc) = (ra + 3, rb + 1, m + 2);
                let (sa, sb, sc) = (lda * ca + 5, ldb * cb + 2, ldc * n + 1);
                let na = (sa * batch) as usize;
                let nb = (sb * batch) as usize;
                let nc = (sc * batch) as usize;
                // values exact in bf16 so that the f64 reference sees what the GPU reads
                let a: Vec<f64> = (0..na).map(|_| rng.int(-64, 64) as f64 / 16.0).collect();
                let b: Vec<f64> = (0..nb).map(|_| rng.int(-64, 64) as f64 / 8.0).collect();
                let c: Vec<f64> = (0..nc).map(|_| rng.int(-100, 100) as f64).collect();
                let d = dev();
                let upload = |v: &[f64]| match ty {
                    DType::F32 => up(&d, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
                    DType::Bf16 => up(
                        &d,
                        &v.iter()
                            .map(|&x| half::bf16::from_f64(x))
                            .collect::<Vec<_>>(),
                    ),
                };
                let (pa, pb) = (upload(&a), upload(&b));
                let pc = up(&d, &c.iter().map(|&x| x as f32).collect::<Vec<_>>());
                let g = Gemm {
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha: 1.5,
                    a: mat(pa, ty, lda, sa),
                    b: mat(pb, ty, ldb, sb),
                    beta: -0.5,
                    c: mat(pc, DType::F32, ldc, sc),
                    batch,
                };
                d.gemm(&g).unwrap();
                let got: Vec<f32> = down(&d, pc, nc);
                let want = gemm_ref(&g, &a, &b, &c);
                for (i, (&x, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (x as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{ta:?}{tb:?} {ty:?} element {i}: {x} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_reads_bf16_inputs_as_the_gpu_rounds_them() {
    // 1/3 as bf16 is 0.333984375: the product uses that value, accumulated in f32
    let d = dev();
    let x = half::bf16::from_f64(1.0 / 3.0);
    let a = up(&d, &[x; 4]);
    let c = zeros::<f32>(&d, 1);
    let g = Gemm {
        ta: Trans::T,
        tb: Trans::N,
        m: 1,
        n: 1,
        k: 4,
        alpha: 1.0,
        a: mat(a, DType::Bf16, 4, 0),
        b: mat(a, DType::Bf16, 4, 0),
        beta: 0.0,
        c: mat(c, DType::F32, 1, 0),
        batch: 1,
    };
    d.gemm(&g).unwrap();
    let want = 4.0 * x.to_f64() * x.to_f64();
    assert!(
        (down::<f32>(&d, c, 1)[0] as f64 - want).abs() < 1e-7,
        "{want}"
    );
}

#[test]
fn gemm_beta_zero_writes_c_without_reading_it_and_alpha_zero_reads_no_operands() {
    let d = dev();
    let a = up(&d, &[1.0f32, 2.0, 3.0, 4.0]);
    let nan = up(&d, &[f32::NAN; 4]);
    let m2 = |p| mat(p, DType::F32, 2, 0);
    let g = Gemm {
        ta: Trans::N,
        tb: Trans::N,
        m: 2,
        n: 2,
        k: 2,
        alpha: 1.0,
        a: m2(a),
        b: m2(a),
        beta: 0.0,
        c: m2(nan),
        batch: 1,
    };
    d.gemm(&g).unwrap();
    assert_eq!(
        down::<f32>(&d, nan, 4),
        [7.0, 10.0, 15.0, 22.0],
        "NaN in C must not propagate when beta = 0"
    );
    // C never written: fine with beta = 0, an initcheck finding with beta != 0
    let fresh = d.alloc(16, false).unwrap();
    d.gemm(&Gemm { c: m2(fresh), ..g }).unwrap();
    let fresh = d.alloc(16, false).unwrap();
    let e = d
        .gemm(&Gemm {
            c: m2(fresh),
            beta: 1.0,
            ..g
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("initcheck") && e.contains("operand C"), "{e}");
    // k = 0: C = beta C; with beta = 0, C = 0 even if it held NaN
    let c = up(&d, &[f32::NAN; 4]);
    d.gemm(&Gemm {
        k: 0,
        c: m2(c),
        ..g
    })
    .unwrap();
    assert_eq!(down::<f32>(&d, c, 4), [0.0; 4]);
    // alpha = 0: A and B are not referenced (reference BLAS), so NaN there is harmless
    let nan = up(&d, &[f32::NAN; 4]);
    let c = up(&d, &[1.0f32, 2.0, 3.0, 4.0]);
    d.gemm(&Gemm {
        alpha: 0.0,
        a: m2(nan),
        b: m2(nan),
        beta: 2.0,
        c: m2(c),
        ..g
    })
    .unwrap();
    assert_eq!(down::<f32>(&d, c, 4), [2.0, 4.0, 6.0, 8.0]);
    // alpha = 0, beta = 1: a quick return, C untouched
    d.gemm(&Gemm {
        alpha: 0.0,
        beta: 1.0,
        c: m2(c),
        ..g
    })
    .unwrap();
    assert_eq!(down::<f32>(&d, c, 4), [2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn gemm_validates_arguments_like_cublas() {
    let d = dev();
    let p = up(&d, &[1.0f32; 64]);
    let q = up(&d, &[1.0f32; 64]);
    let base = Gemm {
        ta: Trans::N,
        tb: Trans::N,
        m: 4,
        n: 3,
        k: 2,
        alpha: 1.0,
        a: mat(p, DType::F32, 4, 0),
        b: mat(p, DType::F32, 2, 0),
        beta: 0.0,
        c: mat(q, DType::F32, 4, 0),
        batch: 1,
    };
    d.gemm(&base).unwrap();
    let f32m = |ld| mat(p, DType::F32, ld, 0);
    for (g, what) in [
        (Gemm { a: f32m(3), ..base }, "lda 3 < max(1, 4)"),
        (
            Gemm {
                ta: Trans::T,
                a: f32m(1),
                ..base
            },
            "lda 1 < max(1, 2)",
        ),
        (Gemm { b: f32m(1), ..base }, "ldb 1 < max(1, 2)"),
        (
            Gemm {
                tb: Trans::T,
                b: f32m(2),
                ..base
            },
            "ldb 2 < max(1, 3)",
        ),
        (
            Gemm {
                c: mat(q, DType::F32, 3, 0),
                ..base
            },
            "ldc 3 < max(1, 4)",
        ),
        (Gemm { m: -1, ..base }, "m=-1"),
        // Sizes past cuBLAS's int are refused, not narrowed into another size.
        (
            Gemm { k: 1 << 32, ..base },
            "k=4294967296 does not fit cuBLAS's 32-bit int",
        ),
        (
            Gemm {
                c: mat(q, DType::F32, 1 << 31, 0),
                ..base
            },
            "ldc=2147483648 does not fit",
        ),
        (
            Gemm {
                batch: 1 << 31,
                ..base
            },
            "batchCount=2147483648 does not fit",
        ),
        (Gemm { batch: -1, ..base }, "batchCount -1"),
        (
            Gemm {
                m: 0,
                c: mat(q, DType::F32, 0, 0),
                ..base
            },
            "ldc 0 < max(1, 0)",
        ),
    ] {
        let e = d.gemm(&g).unwrap_err().to_string();
        assert!(
            e.contains("CUBLAS_STATUS_INVALID_VALUE") && e.contains(what),
            "{what}: {e}"
        );
    }
    let e = d
        .gemm(&Gemm {
            b: mat(p, DType::Bf16, 2, 0),
            ..base
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("CUBLAS_STATUS_NOT_SUPPORTED"), "{e}");
    // zero-sized work is a successful no-op
    d.gemm(&Gemm { batch: 0, ..base }).unwrap();
    d.gemm(&Gemm { n: 0, ..base }).unwrap();
}

#[test]
fn gemm_operands_outside_their_allocations_are_memcheck_errors() {
    let d = dev();
    let small = up(&d, &[1.0f32; 7]);
    let big = up(&d, &[1.0f32; 64]);
    let out = zeros::<f32>(&d, 64);
    let base = Gemm {
        ta: Trans::N,
        tb: Trans::N,
        m: 4,
        n: 4,
        k: 2,
        alpha: 1.0,
        a: mat(big, DType::F32, 4, 0),
        b: mat(big, DType::F32, 2, 0),
        beta: 0.0,
        c: mat(out, DType::F32, 4, 0),
        batch: 1,
    };
    d.gemm(&base).unwrap();
    // A spans 4 x 2 = 8 floats
    let e = d
        .gemm(&Gemm {
            a: mat(small, DType::F32, 4, 0),
            ..base
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("memcheck") && e.contains("operand A"), "{e}");
    // the second batch entry of C runs past the end
    let e = d
        .gemm(&Gemm {
            batch: 2,
            c: mat(out, DType::F32, 4, 60),
            ..base
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("memcheck") && e.contains("operand C of batch entry 1"),
        "{e}"
    );
    // a freed operand
    d.free(small).unwrap();
    let e = d
        .gemm(&Gemm {
            b: mat(small, DType::F32, 2, 0),
            ..base
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("memcheck") && e.contains("freed"), "{e}");
}
