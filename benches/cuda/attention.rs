//! Flash attention against the materialised path.

use super::*;

/// Causal attention at Llama-3.2-1B's head layout (GQA, head dim 64): flash attention
/// against the materialised path (cuBLAS products, f32 probabilities kept), forward alone
/// and forward + backward.
pub(crate) fn attention(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    let s = sh.attn;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let rows = s.batch * s.tq;
    let (qw, kw) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let hq = rnd(&mut rng, rows * qw, 1.0);
    let hk = rnd(&mut rng, s.batch * s.tk_stride * kw, 1.0);
    let hv = rnd(&mut rng, s.batch * s.tk_stride * kw, 1.0);
    let hdout = rnd(&mut rng, rows * qw, 1.0);
    let up = |v: &[f32]| g.buf(v.to_vec()).unwrap();
    let (q, k, v, dout) = (up(&hq), up(&hk), up(&hv), up(&hdout));
    let (want_fwd, want_bwd) = if mode.sim() {
        let c = CpuBackend::new(2);
        let (oc, sc) = c.attention(&hq, &hk, &hv, &s).unwrap();
        let (dq, dk, dv) = c
            .attention_backward(&hdout, &hq, &hk, &hv, &oc, &sc, None, GradFeeds::Summed, &s)
            .unwrap();
        (vec![("out", oc)], vec![("dq", dq), ("dk", dk), ("dv", dv)])
    } else {
        (vec![], vec![])
    };
    let res: RefCell<Vec<Act>> = RefCell::new(vec![]);
    for (name, work, backward, want) in [
        ("forward", roofline::attention_forward(&s), false, want_fwd),
        (
            "forward_backward",
            roofline::attention_forward_backward(&s),
            true,
            want_bwd,
        ),
    ] {
        let want = Rc::new(want);
        let names: &'static [&'static str] = if backward {
            &["dq", "dk", "dv"]
        } else {
            &["out"]
        };
        let res = &res;
        let got: Rc<dyn Fn() -> Outs> = Rc::new(move || {
            names
                .iter()
                .zip(res.borrow().iter())
                .map(|(n, b)| (*n, down(g, b)))
                .collect()
        });
        // The materialised path's own entry points take f32 buffers (as the bench's are);
        // flash attention takes q, k and v as stored.
        fn f32_of(b: &Act) -> &DevBuf<f32> {
            b.f32().expect("the bench's inputs are f32")
        }
        let (qf, kf, vf, doutf) = (f32_of(&q), f32_of(&k), f32_of(&v), f32_of(&dout));
        let (q, k, v, dout) = (&q, &k, &v, &dout);
        let flash: Rc<dyn Fn()> = Rc::new(move || {
            let (out, lse) = g.flash_attention(q, k, v, &s).unwrap();
            *res.borrow_mut() = if backward {
                // f32 gradients, as the materialised path and the counted bytes have them.
                let (dq, dk, dv) = g
                    .flash_attention_backward(dout, q, k, v, &out, &lse, None, DType::F32, &s)
                    .unwrap();
                vec![dq, dk, dv]
            } else {
                vec![out.into()]
            };
        });
        let materialised: Rc<dyn Fn()> = Rc::new(move || {
            let (out, probs) = g.attention_materialised(qf, kf, vf, &s).unwrap();
            *res.borrow_mut() = if backward {
                let (dq, dk, dv) = g
                    .attention_materialised_backward(doutf, qf, kf, vf, &probs, &s)
                    .unwrap();
                vec![dq.into(), dk.into(), dv.into()]
            } else {
                vec![out.into()]
            };
        });
        let variant = |vname: &str, call, bound| Variant {
            name: vname.into(),
            work,
            call,
            got: got.clone(),
            want: want.clone(),
            bound,
        };
        mode.run(
            g,
            Group {
                name: format!(
                    "{}_attention_{}x{}_h{}_kv{}_d{}_{name}",
                    sh.prefix, s.batch, s.tq, s.n_heads, s.n_kv_heads, s.head_dim
                ),
                sample_size: None,
                reset: Rc::new(|| res.borrow_mut().clear()),
                variants: vec![
                    variant("flash", flash, TC_BOUND),
                    variant("materialised", materialised, F32_BOUND),
                ],
            },
        );
    }
}
