//! The LoRA GEMM's tilings side by side (`LoraGemmTiling`: kernels/lora_gemm.cu and
//! lora_gemm_tiles.cu): one Llama layer's projections, forward and backward with the LoRA
//! weight gradients, as the training step runs them (q/k/v and gate/up reading the normed
//! hidden states stored bf16, with bf16 output gradients; o reading the f32 attention
//! output and down the bf16 SwiGLU output, both with f32 residual gradients), once per
//! tiling. On a GPU criterion times each; on the simulator each runs once, checked against
//! the CPU backend. The engine's own tiling is the first variant; the others are there to
//! say which to make the engine's; the last three run the layer on the other projection
//! paths (`ProjectionGemm`): `hybrid` (base products on cuBLAS), `cublas` (the plain
//! cuBLAS sequence, the default), which every tiling has to beat, and `folded` (the LoRA
//! update as cuBLAS's C operand).

use super::*;

/// The stored inputs of one projection group: `x` and its output gradients as the model
/// holds them, and what reads `y`.
struct GroupSpec {
    d_in: usize,
    outs: Vec<usize>,
    x_bf16: bool,
    g_bf16: bool,
    feeds: Feeds,
}

/// A projection's LoRA gradients `(dA, dB)`, added to by each backward.
type LoraGrads<B> = RefCell<(<B as Backend>::Buf, <B as Backend>::Buf)>;

/// A layer's groups on one backend: inputs, weights, LoRA factors and their gradients.
struct Layer<B: Backend> {
    x: Vec<B::Buf>,
    w: Vec<Vec<B::Weight>>,
    ab: Vec<Vec<(B::Buf, B::Buf)>>,
    g: Vec<Vec<B::Buf>>,
    grads: Vec<Vec<LoraGrads<B>>>,
}

/// Host values of every input, drawn once and given to both backends.
struct HostLayer {
    x: Vec<Vec<f32>>,
    w: Vec<Vec<Vec<f32>>>,
    ab: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    g: Vec<Vec<Vec<f32>>>,
}

const Y_NAMES: [&str; 7] = ["y_q", "y_k", "y_v", "y_o", "y_gate", "y_up", "y_down"];
const DX_NAMES: [&str; 4] = ["dx_qkv", "dx_o", "dx_gate_up", "dx_down"];

/// Forward then backward of every group of `l`: the outputs `y` in order and each
/// group's `dx` (the LoRA gradients are added into `l.grads`).
fn run_layer<B: Backend>(
    be: &B,
    m: usize,
    lg: LoraGroup,
    specs: &[GroupSpec],
    l: &Layer<B>,
) -> (Vec<B::Buf>, Vec<B::Buf>) {
    let (mut ys, mut dxs) = (Vec::new(), Vec::new());
    for (i, s) in specs.iter().enumerate() {
        let fwd: Vec<ProjFwd<'_, B>> = (0..s.outs.len())
            .map(|p| ProjFwd {
                w: &l.w[i][p],
                d_out: s.outs[p],
                lora: Some((&l.ab[i][p].0, &l.ab[i][p].1)),
                feeds: s.feeds,
                rope: None,
            })
            .collect();
        let out = be.project_group(&l.x[i], m, s.d_in, lg, &fwd).unwrap();
        let mut grads: Vec<_> = l.grads[i].iter().map(|c| c.borrow_mut()).collect();
        let bwd: Vec<ProjBwd<'_, B>> = grads
            .iter_mut()
            .enumerate()
            .map(|(p, dab)| {
                let (da, db) = &mut **dab;
                ProjBwd {
                    w: &l.w[i][p],
                    d_out: s.outs[p],
                    g: &l.g[i][p],
                    lora: Some(LoraBwd {
                        a: &l.ab[i][p].0,
                        b: &l.ab[i][p].1,
                        u: out[p].1.as_ref().expect("adapted projections keep u"),
                        grads: Some((da, db)),
                    }),
                }
            })
            .collect();
        let mut dx = be.zeros(m * s.d_in).unwrap();
        be.project_group_backward(&l.x[i], m, s.d_in, lg, bwd, &mut dx, false)
            .unwrap();
        ys.extend(out.into_iter().map(|(y, _)| y));
        dxs.push(dx);
    }
    (ys, dxs)
}

/// `h` on `be`: activations and gradients from `act` (called for each group's x, then
/// each group's gradients, in order, with the host values), weights and LoRA factors as
/// given, zero LoRA gradients.
fn upload<B: Backend>(
    be: &B,
    specs: &[GroupSpec],
    h: &HostLayer,
    mut act: impl FnMut(&[f32]) -> B::Buf,
) -> Layer<B> {
    let up = |v: &[f32]| be.buf(v.to_vec()).unwrap();
    let x: Vec<B::Buf> = h.x.iter().map(|x| act(x)).collect();
    let g: Vec<Vec<B::Buf>> =
        h.g.iter()
            .map(|gs| gs.iter().map(|g| act(g)).collect())
            .collect();
    Layer {
        x,
        w: specs
            .iter()
            .zip(&h.w)
            .map(|(s, ws)| {
                ws.iter()
                    .zip(&s.outs)
                    .map(|(w, &o)| be.weight(w.clone(), o, s.d_in).unwrap())
                    .collect()
            })
            .collect(),
        ab: h
            .ab
            .iter()
            .map(|g| g.iter().map(|(a, b)| (up(a), up(b))).collect())
            .collect(),
        g,
        grads: h
            .ab
            .iter()
            .map(|g| {
                g.iter()
                    .map(|(a, b)| {
                        RefCell::new((be.zeros(a.len()).unwrap(), be.zeros(b.len()).unwrap()))
                    })
                    .collect()
            })
            .collect(),
    }
}

pub(super) fn lora_gemm_tilings(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    let (bsz, seq) = sh.step;
    let (m, r) = (bsz * seq, sh.lora.r);
    let lg = LoraGroup { r, scale: 2.0 };
    // q/k/v, o, gate/up, down: whether x and g are stored bf16 (with bf16 base weights)
    // and what reads y.
    let stored = [
        (true, true, Feeds::Kernels),
        (false, false, Feeds::Residual),
        (true, true, Feeds::Kernels),
        (true, false, Feeds::Residual),
    ];
    let specs: Vec<GroupSpec> = roofline::layer_groups(&sh.model)
        .into_iter()
        .zip(stored)
        .map(|((d_in, outs), (x_bf16, g_bf16, feeds))| GroupSpec {
            d_in,
            outs,
            x_bf16,
            g_bf16,
            feeds,
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Activations and gradients: normed rows (`stored_act`), bf16 where the model keeps
    // them so; the host keeps the values as stored.
    let mut acts: Vec<Act> = Vec::new();
    let mut act = |rows: usize, dim: usize, bf16: bool, rng: &mut ChaCha8Rng| {
        let (a, held) = stored_act(g, rng, rows, dim);
        let a = if bf16 {
            a
        } else {
            g.buf(held.clone()).unwrap()
        };
        acts.push(a);
        held
    };
    let h = HostLayer {
        x: specs
            .iter()
            .map(|s| act(m, s.d_in, s.x_bf16, &mut rng))
            .collect(),
        w: specs
            .iter()
            .map(|s| {
                s.outs
                    .iter()
                    .map(|&o| rnd(&mut rng, o * s.d_in, 0.02))
                    .collect()
            })
            .collect(),
        ab: specs
            .iter()
            .map(|s| {
                s.outs
                    .iter()
                    .map(|&o| (rnd(&mut rng, r * s.d_in, 0.02), rnd(&mut rng, o * r, 0.02)))
                    .collect()
            })
            .collect(),
        g: specs
            .iter()
            .map(|s| {
                s.outs
                    .iter()
                    .map(|&o| act(m, o, s.g_bf16, &mut rng))
                    .collect()
            })
            .collect(),
    };
    // The device's stored activations, made above in the order `upload` asks for them:
    // each group's x, then each group's gradients.
    let mut stored_acts = acts.into_iter();
    let layer = upload(g, &specs, &h, |_| {
        stored_acts.next().expect("one stored activation per input")
    });
    let want = if mode.sim() {
        let c = CpuBackend::new(2);
        let cl = upload(&c, &specs, &h, |v| v.to_vec());
        let (ys, dxs) = run_layer(&c, m, lg, &specs, &cl);
        Y_NAMES
            .into_iter()
            .zip(ys)
            .chain(DX_NAMES.into_iter().zip(dxs))
            .collect()
    } else {
        Vec::new()
    };
    let want = Rc::new(want);
    let out: RefCell<(Vec<Act>, Vec<Act>)> = RefCell::new((Vec::new(), Vec::new()));
    let got: Rc<dyn Fn() -> Outs> = Rc::new(|| {
        let out = out.borrow();
        let ys = Y_NAMES.into_iter().zip(out.0.iter().map(|y| down(g, y)));
        ys.chain(DX_NAMES.into_iter().zip(out.1.iter().map(|d| down(g, d))))
            .collect()
    });
    let reset = Rc::new(|| {
        for (dab, (a, b)) in layer.grads.iter().flatten().zip(h.ab.iter().flatten()) {
            *dab.borrow_mut() = (g.zeros(a.len()).unwrap(), g.zeros(b.len()).unwrap());
        }
    });
    let work = roofline::lora_layer(&sh.model, m, r);
    // Every tiling on the fused path (named for the tiling), then the other paths at
    // the engine's tiling (named for the path), each for its call only (`with_path`).
    let runs = LoraGemmTiling::all()
        .into_iter()
        .map(|t| (t.name(), ProjectionGemm::Fused, t))
        .chain(
            [
                ProjectionGemm::Hybrid,
                ProjectionGemm::Cublas,
                ProjectionGemm::Folded,
            ]
            .map(|p| (p.name().to_string(), p, LoraGemmTiling::ENGINE)),
        );
    let variants = runs
        .map(|(name, path, t)| {
            let (layer, specs, out) = (&layer, &specs, &out);
            Variant {
                name,
                work,
                call: Rc::new(move || {
                    *out.borrow_mut() = with_path(g, path, t, || run_layer(g, m, lg, specs, layer));
                }),
                got: got.clone(),
                want: want.clone(),
                bound: TC_BOUND,
            }
        })
        .collect();
    mode.run(
        g,
        Group {
            name: format!(
                "{}_lora_gemm_tilings_layer_{m}x{}_r{r}",
                sh.prefix, sh.model.hidden_size
            ),
            sample_size: Some(10),
            reset,
            variants,
        },
    );
}
