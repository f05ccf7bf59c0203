//! LoRA: the fused per-projection kernels and the projection groups (LoRA inside the
//! GEMMs) against the plain cuBLAS sequences.

use super::*;

/// Fused LoRA forward/backward against the cuBLAS sequences.
pub(crate) fn lora(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    let sim = mode.sim();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let d = sh.lora;
    let hx = rnd(&mut rng, d.m * d.d_in, 1.0);
    let ha = rnd(&mut rng, d.r * d.d_in, 0.02);
    let hb = rnd(&mut rng, d.d_out * d.r, 0.02);
    let hg = rnd(&mut rng, d.m * d.d_out, 1.0);
    let up = |v: &[f32]| g.buf(v.to_vec()).unwrap();
    let (x, a, b, gr) = (up(&hx), up(&ha), up(&hb), up(&hg));
    let zeros = |n: usize| RefCell::new(g.zeros(n).unwrap());
    let (y, dx) = (zeros(d.m * d.d_out), zeros(d.m * d.d_in));
    let (da, db) = (zeros(d.r * d.d_in), zeros(d.d_out * d.r));
    // The backward's saved `u = x A^T`, from the fused forward.
    let u = g.lora_forward(&x, &a, &b, d, &mut y.borrow_mut()).unwrap();
    let reset = Rc::new(|| {
        for (buf, n) in [
            (&y, d.m * d.d_out),
            (&dx, d.m * d.d_in),
            (&da, d.r * d.d_in),
            (&db, d.d_out * d.r),
        ] {
            *buf.borrow_mut() = g.zeros(n).unwrap();
        }
    });
    let (want_fwd, want_bwd) = if sim {
        let c = CpuBackend::new(2);
        let mut yc = vec![0.0; d.m * d.d_out];
        let uc = c.lora_forward(&hx, &ha, &hb, d, &mut yc).unwrap();
        let mut dxc = vec![0.0; d.m * d.d_in];
        let (mut dac, mut dbc) = (vec![0.0; ha.len()], vec![0.0; hb.len()]);
        c.lora_backward(
            &hg,
            &hx,
            &uc,
            &ha,
            &hb,
            d,
            &mut dxc,
            Some((&mut dac, &mut dbc)),
        )
        .unwrap();
        (vec![("y", yc)], vec![("dx", dxc), ("dA", dac), ("dB", dbc)])
    } else {
        (vec![], vec![])
    };
    let (want_fwd, want_bwd) = (Rc::new(want_fwd), Rc::new(want_bwd));
    let got_fwd: Rc<dyn Fn() -> Outs> = Rc::new(|| vec![("y", down(g, &y.borrow()))]);
    let got_bwd: Rc<dyn Fn() -> Outs> = Rc::new(|| {
        vec![
            ("dx", down(g, &dx.borrow())),
            ("dA", down(g, &da.borrow())),
            ("dB", down(g, &db.borrow())),
        ]
    });
    let (wf, wb) = (roofline::lora_forward(d), roofline::lora_backward(d));
    let fwd = |name: &str, call: Rc<dyn Fn()>| Variant {
        name: name.into(),
        work: wf,
        call,
        got: got_fwd.clone(),
        want: want_fwd.clone(),
        bound: F32_BOUND,
    };
    let bwd = |name: &str, call: Rc<dyn Fn()>| Variant {
        name: name.into(),
        work: wb,
        call,
        got: got_bwd.clone(),
        want: want_bwd.clone(),
        bound: F32_BOUND,
    };
    let out_dim = if d.d_out == d.d_in {
        String::new()
    } else {
        format!("_o{}", d.d_out)
    };
    mode.run(
        g,
        Group {
            name: format!("{}_lora_{}x{}_r{}{out_dim}", sh.prefix, d.m, d.d_in, d.r),
            sample_size: None,
            reset,
            variants: vec![
                fwd(
                    "forward_fused",
                    Rc::new(|| {
                        g.lora_forward(&x, &a, &b, d, &mut y.borrow_mut()).unwrap();
                    }),
                ),
                fwd(
                    "forward_cublas",
                    Rc::new(|| {
                        g.lora_forward_unfused(&x, &a, &b, d, &mut y.borrow_mut())
                            .unwrap();
                    }),
                ),
                bwd(
                    "backward_fused",
                    Rc::new(|| {
                        let (mut da, mut db) = (da.borrow_mut(), db.borrow_mut());
                        g.lora_backward(
                            &gr,
                            &x,
                            &u,
                            &a,
                            &b,
                            d,
                            &mut dx.borrow_mut(),
                            Some((&mut da, &mut db)),
                        )
                        .unwrap();
                    }),
                ),
                bwd(
                    "backward_cublas",
                    Rc::new(|| {
                        g.lora_backward_unfused(
                            &gr,
                            &x,
                            &u,
                            &a,
                            &b,
                            d,
                            &mut dx.borrow_mut(),
                            Some((&mut da.borrow_mut(), &mut db.borrow_mut())),
                        )
                        .unwrap();
                    }),
                ),
            ],
        },
    );
}

/// LoRA inside the GEMMs (q/k/v as one grouped tensor-core GEMM with the low-rank update
/// as a second K segment, `Backend::project_group`) against the plain cuBLAS sequence
/// (per projection: base GEMM, `u = x A^T`, `y += s u B^T`; backward likewise).
///
/// The q/k/v group with its inputs as the model stores them: the normed hidden states (bf16
/// with bf16 base weights) and bf16 output gradients (as flash attention's backward stores
/// them); f32 outputs (the cuBLAS sequence adds its LoRA update into f32), where the model
/// stores q/k/v bf16.
pub(crate) fn lora_group(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    let (m, d_in, outs, r) = sh.group;
    let lg = LoraGroup { r, scale: 2.0 };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (x, hx) = stored_act(g, &mut rng, m, d_in);
    let hw: Vec<Vec<f32>> = outs
        .iter()
        .map(|&o| rnd(&mut rng, o * d_in, 0.02))
        .collect();
    let ha: Vec<Vec<f32>> = outs.iter().map(|_| rnd(&mut rng, r * d_in, 0.02)).collect();
    let hb: Vec<Vec<f32>> = outs.iter().map(|&o| rnd(&mut rng, o * r, 0.02)).collect();
    let (gr, hg): (Vec<Act>, Vec<Vec<f32>>) =
        outs.iter().map(|&o| stored_act(g, &mut rng, m, o)).unzip();
    let up = |v: &[f32]| g.buf(v.to_vec()).unwrap();
    let ws: Vec<_> = outs
        .iter()
        .zip(&hw)
        .map(|(&o, w)| g.weight(w.clone(), o, d_in).unwrap())
        .collect();
    let (a, b): (Vec<_>, Vec<_>) = (
        ha.iter().map(|v| up(v)).collect(),
        hb.iter().map(|v| up(v)).collect(),
    );
    let fwd: Vec<ProjFwd<'_, CudaBackend>> = (0..3)
        .map(|i| ProjFwd {
            w: &ws[i],
            d_out: outs[i],
            lora: Some((&a[i], &b[i])),
            feeds: Feeds::Residual,
            rope: None,
        })
        .collect();
    // The backward's saved u_p, from the fused forward (also the first launches that
    // scripts/gpu-check.sh --profile hands to ncu: u, then y with the base products).
    let us: Vec<Act> = with_path(g, ProjectionGemm::Fused, g.lora_gemm_tiling(), || {
        g.project_group(&x, m, d_in, lg, &fwd)
    })
    .unwrap()
    .into_iter()
    .filter_map(|(_, u)| u)
    .collect();
    let zeros = |n: usize| RefCell::new(g.zeros(n).unwrap());
    let dx = zeros(m * d_in);
    let da: Vec<_> = outs.iter().map(|_| zeros(r * d_in)).collect();
    let db: Vec<_> = outs.iter().map(|&o| zeros(o * r)).collect();
    let ys: RefCell<Vec<Act>> = RefCell::new(Vec::new());
    let gas: RefCell<Vec<Act>> = RefCell::new(Vec::new());
    let reset = Rc::new(|| {
        *dx.borrow_mut() = g.zeros(m * d_in).unwrap();
        for (i, &o) in outs.iter().enumerate() {
            *da[i].borrow_mut() = g.zeros(r * d_in).unwrap();
            *db[i].borrow_mut() = g.zeros(o * r).unwrap();
        }
    });
    let (want_fwd, want_bwd) = if mode.sim() {
        let c = CpuBackend::new(2);
        let cw: Vec<_> = outs
            .iter()
            .zip(&hw)
            .map(|(&o, w)| c.weight(w.clone(), o, d_in).unwrap())
            .collect();
        let cfwd: Vec<ProjFwd<'_, CpuBackend>> = (0..3)
            .map(|i| ProjFwd {
                w: &cw[i],
                d_out: outs[i],
                lora: Some((&ha[i], &hb[i])),
                feeds: Feeds::Residual,
                rope: None,
            })
            .collect();
        let yu = c.project_group(&hx, m, d_in, lg, &cfwd).unwrap();
        let mut dxc = vec![0.0; m * d_in];
        let mut dac: Vec<Vec<f32>> = outs.iter().map(|_| vec![0.0; r * d_in]).collect();
        let mut dbc: Vec<Vec<f32>> = outs.iter().map(|&o| vec![0.0; o * r]).collect();
        let cbwd: Vec<ProjBwd<'_, CpuBackend>> = dac
            .iter_mut()
            .zip(dbc.iter_mut())
            .enumerate()
            .map(|(i, (da, db))| ProjBwd {
                w: &cw[i],
                d_out: outs[i],
                g: &hg[i],
                lora: yu[i].1.as_ref().map(|u| LoraBwd {
                    a: &ha[i],
                    b: &hb[i],
                    u,
                    grads: Some((da, db)),
                }),
            })
            .collect();
        let gac = c
            .project_group_backward(&hx, m, d_in, lg, cbwd, &mut dxc, false)
            .unwrap();
        let mut f: Outs = Vec::new();
        for (i, (y, _)) in yu.into_iter().enumerate() {
            f.push((["y_q", "y_k", "y_v"][i], y));
        }
        let mut bw: Outs = vec![("dx", dxc)];
        for (i, ga) in gac.into_iter().enumerate() {
            bw.push((["gA_q", "gA_k", "gA_v"][i], ga.unwrap_or_default()));
        }
        for (i, (da, db)) in dac.into_iter().zip(dbc).enumerate() {
            bw.push((["dA_q", "dA_k", "dA_v"][i], da));
            bw.push((["dB_q", "dB_k", "dB_v"][i], db));
        }
        (f, bw)
    } else {
        (vec![], vec![])
    };
    let (want_fwd, want_bwd) = (Rc::new(want_fwd), Rc::new(want_bwd));
    let got_fwd: Rc<dyn Fn() -> Outs> = Rc::new(|| {
        let names = ["y_q", "y_k", "y_v"];
        ys.borrow()
            .iter()
            .zip(names)
            .map(|(y, n)| (n, down(g, y)))
            .collect()
    });
    let got_bwd: Rc<dyn Fn() -> Outs> = Rc::new(|| {
        let mut o: Outs = vec![("dx", down(g, &dx.borrow()))];
        for (ga, n) in gas.borrow().iter().zip(["gA_q", "gA_k", "gA_v"]) {
            o.push((n, down(g, ga)));
        }
        for i in 0..3 {
            o.push((["dA_q", "dA_k", "dA_v"][i], down(g, &da[i].borrow())));
            o.push((["dB_q", "dB_k", "dB_v"][i], down(g, &db[i].borrow())));
        }
        o
    });
    // Each variant on its projection path (`ProjectionGemm`), the backend's own restored
    // after (`with_path`).
    let forward = |path: ProjectionGemm| -> Rc<dyn Fn() + '_> {
        let (fwd, ys, x) = (&fwd, &ys, &x);
        Rc::new(move || {
            let out = with_path(g, path, g.lora_gemm_tiling(), || {
                g.project_group(x, m, d_in, lg, fwd)
            });
            *ys.borrow_mut() = out.unwrap().into_iter().map(|(y, _)| y).collect();
        })
    };
    let backward = |path: ProjectionGemm| -> Rc<dyn Fn() + '_> {
        let (ws, a, b, gr, us, x) = (&ws, &a, &b, &gr, &us, &x);
        let (dx, da, db, gas) = (&dx, &da, &db, &gas);
        Rc::new(move || {
            let mut das: Vec<_> = da.iter().map(|d| d.borrow_mut()).collect();
            let mut dbs: Vec<_> = db.iter().map(|d| d.borrow_mut()).collect();
            let projs: Vec<ProjBwd<'_, CudaBackend>> = das
                .iter_mut()
                .zip(dbs.iter_mut())
                .enumerate()
                .map(|(i, (da, db))| ProjBwd {
                    w: &ws[i],
                    d_out: outs[i],
                    g: &gr[i],
                    lora: Some(LoraBwd {
                        a: &a[i],
                        b: &b[i],
                        u: &us[i],
                        grads: Some((&mut **da, &mut **db)),
                    }),
                })
                .collect();
            let mut dx = dx.borrow_mut();
            let out = with_path(g, path, g.lora_gemm_tiling(), || {
                g.project_group_backward(x, m, d_in, lg, projs, &mut dx, false)
            });
            *gas.borrow_mut() = out.unwrap().into_iter().flatten().collect();
        })
    };
    let bound = if g.base_dtype() == BaseDtype::Bf16 {
        TC_BOUND
    } else {
        F32_BOUND
    };
    let (wf, wb) = (
        roofline::lora_group_forward(m, d_in, &outs, r),
        roofline::lora_group_backward(m, d_in, &outs, r),
    );
    let variant = |name: &str, work, call, fwd: bool| Variant {
        name: name.into(),
        work,
        call,
        got: if fwd {
            got_fwd.clone()
        } else {
            got_bwd.clone()
        },
        want: if fwd {
            want_fwd.clone()
        } else {
            want_bwd.clone()
        },
        bound,
    };
    mode.run(
        g,
        Group {
            name: format!(
                "{}_lora_qkv_{m}x{d_in}_o{}+{}+{}_r{r}",
                sh.prefix, outs[0], outs[1], outs[2]
            ),
            sample_size: None,
            reset,
            variants: [true, false]
                .into_iter()
                .flat_map(|fwd| {
                    ProjectionGemm::ALL.map(|path| {
                        let (pass, work) = if fwd {
                            ("forward", wf)
                        } else {
                            ("backward", wb)
                        };
                        let call = if fwd { forward(path) } else { backward(path) };
                        variant(&format!("{pass}_{}", path.name()), work, call, fwd)
                    })
                })
                .collect(),
        },
    );
}
