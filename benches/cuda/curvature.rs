//! The curvature primitives: per-sample squaring (diag) and the KFAC Grams, each kernel
//! against the SIMT kernel and cuBLAS products it replaces.

use super::*;

/// A group whose variants all compute the same accumulated output `out` (zeroed by reset)
/// from the same inputs: the curvature primitives.
fn same_output<'a>(
    name: String,
    g: &'a CudaBackend,
    out: &'a RefCell<Act>,
    n: usize,
    work: Work,
    want: Outs,
    variants: Vec<(&'static str, f64, Call<'a>)>,
) -> Group<'a> {
    let want = Rc::new(want);
    let got: Rc<dyn Fn() -> Outs + 'a> = Rc::new(move || vec![("out", down(g, &out.borrow()))]);
    Group {
        name,
        sample_size: None,
        reset: Rc::new(move || *out.borrow_mut() = g.zeros(n).unwrap()),
        variants: variants
            .into_iter()
            .map(|(name, bound, call)| Variant {
                name: name.into(),
                work,
                call,
                got: got.clone(),
                want: want.clone(),
                bound,
            })
            .collect(),
    }
}

/// Per-sample squaring (diag): the tensor-core kernel, the SIMT one and the materialised
/// cuBLAS products; A's orientation (r, d).
pub(crate) fn diag(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    let (n_seg, len) = sh.diag;
    let (r, d) = (sh.lora.r, sh.lora.d_in);
    let rows = n_seg * len;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (hga, hx) = (rnd(&mut rng, rows * r, 1.0), rnd(&mut rng, rows * d, 1.0));
    let segs: Vec<Segment> = (0..n_seg)
        .map(|i| Segment {
            start: i * len,
            len,
        })
        .collect();
    let (ga, x) = (g.buf(hga.clone()).unwrap(), g.buf(hx.clone()).unwrap());
    let f = RefCell::new(g.zeros(r * d).unwrap());
    let want = if mode.sim() {
        let mut fc = vec![0.0; r * d];
        CpuBackend::new(2)
            .sq_grad_accumulate(&hga, r, &hx, d, &segs, 1.0, &mut fc)
            .unwrap();
        vec![("out", fc)]
    } else {
        vec![]
    };
    let group = same_output(
        format!("{}_diag_{n_seg}x{len}_r{r}_d{d}", sh.prefix),
        g,
        &f,
        r * d,
        roofline::sq_grad(rows, n_seg, r, d),
        want,
        vec![
            (
                "per_sample_squaring",
                TC_BOUND,
                Rc::new(|| {
                    g.sq_grad_accumulate(&ga, r, &x, d, &segs, 1.0, &mut f.borrow_mut())
                        .unwrap()
                }),
            ),
            (
                "per_sample_squaring_simt",
                F32_BOUND,
                Rc::new(|| {
                    g.sq_grad_simt(&ga, r, &x, d, &segs, 1.0, &mut f.borrow_mut())
                        .unwrap()
                }),
            ),
            (
                "materialised_cublas",
                F32_BOUND,
                Rc::new(|| {
                    g.sq_grad_materialized(&ga, r, &x, d, &segs, 1.0, &mut f.borrow_mut())
                        .unwrap()
                }),
            ),
        ],
    );
    mode.run(g, group);
}

/// KFAC factors over `rows` positions: the symmetric input factor X^T X and the kfac-tri
/// cross factor X^T Y, each by the tensor-core kernel on f32 operands (tf32 mma) and on
/// the same values stored bf16 (bf16 mma, as the bf16 engine's activations reach it), the
/// SIMT one, one f32 cuBLAS GEMM, and the bf16 operands on cuBLAS as `GramGemm::Cublas`
/// forms them (row panels of the upper triangle, or one GEMM for the cross factor). The
/// values are bf16 ones (RMS-normed, `stored_act`), so every variant computes the same
/// exact products (tf32 holds a bf16 value exactly), and each is held to the f32 bound.
pub(crate) fn kfac(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    let (rows, d) = sh.kfac;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (xb, hx) = stored_act(g, &mut rng, rows, d);
    let (yb, hy) = stored_act(g, &mut rng, rows, d);
    let (x, y) = (g.buf(hx.clone()).unwrap(), g.buf(hy.clone()).unwrap());
    let all = [Segment {
        start: 0,
        len: rows,
    }];
    let cf = RefCell::new(g.zeros(d * d).unwrap());
    for cross in [false, true] {
        let want = if mode.sim() {
            let mut oc = vec![0.0; d * d];
            let other = if cross { &hy } else { &hx };
            CpuBackend::new(2)
                .gram_accumulate(&hx, d, other, d, &all, 1.0, &mut oc)
                .unwrap();
            vec![("out", oc)]
        } else {
            vec![]
        };
        let (other, other_b) = if cross { (&y, &yb) } else { (&x, &xb) };
        let (name, names) = if cross {
            (
                format!("{}_kfac_cross_{rows}x{d}x{d}", sh.prefix),
                [
                    "tensor_cores",
                    "tensor_cores_bf16",
                    "simt",
                    "cublas_gemm",
                    "cublas_gemm_bf16",
                ],
            )
        } else {
            (
                format!("{}_kfac_factor_{rows}x{d}", sh.prefix),
                [
                    "hand_written_symmetric",
                    "hand_written_symmetric_bf16",
                    "simt_symmetric",
                    "cublas_gemm",
                    "cublas_panels_bf16",
                ],
            )
        };
        let (x, xb, cf) = (&x, &xb, &cf);
        let group = same_output(
            name,
            g,
            cf,
            d * d,
            roofline::gram(rows, d, d, !cross),
            want,
            vec![
                (
                    names[0],
                    F32_BOUND,
                    Rc::new(move || {
                        g.gram_accumulate(x, d, other, d, &all, 1.0, &mut cf.borrow_mut())
                            .unwrap()
                    }),
                ),
                (
                    names[1],
                    F32_BOUND,
                    Rc::new(move || {
                        with_grams(g, GramGemm::HandWritten, || {
                            g.gram_accumulate(xb, d, other_b, d, &all, 1.0, &mut cf.borrow_mut())
                        })
                        .unwrap()
                    }),
                ),
                (
                    names[2],
                    F32_BOUND,
                    Rc::new(move || {
                        g.gram_simt(x, d, other, d, &all, 1.0, &mut cf.borrow_mut())
                            .unwrap()
                    }),
                ),
                (
                    names[3],
                    F32_BOUND,
                    Rc::new(move || {
                        g.gram_cublas(x, d, other, d, rows, 1.0, &mut cf.borrow_mut())
                            .unwrap()
                    }),
                ),
                (
                    names[4],
                    F32_BOUND,
                    Rc::new(move || {
                        with_grams(g, GramGemm::Cublas, || {
                            g.gram_accumulate(xb, d, other_b, d, &all, 1.0, &mut cf.borrow_mut())
                        })
                        .unwrap()
                    }),
                ),
            ],
        );
        mode.run(g, group);
    }
}
