//! The whole pipeline on the tiny model, on both backends, every tensor compared: LoRA
//! gradients, curvature (diag, kfac expand and reduce, kfac-tri; empirical and Monte-Carlo
//! Fisher) at a point where `B != 0`, and three training steps (plain, with the fused
//! diagonal penalty, with the kfac-tri penalty). Both backends run behind a `Tap`, so
//! that the reference's Monte-Carlo Fisher uses the labels the device drew.

use super::check::Checker;
use super::check::Tolerance::EndToEnd;
use super::tap::Tap;
use super::tiny::{self, BATCH};
use crate::backend::Backend;
use crate::curvature::{Curvature, Fisher, KfacApprox, Scheme, Spec, estimate};
use crate::data::{Example, batches};
use crate::error::{Error, Result};
use crate::model::{HostLora, Llama};
use crate::train::session::{self, SessionOptions, SessionResult};
use crate::train::{Penalty, StepMetrics, TrainConfig, accumulate_gradients};

/// The device records the labels it samples; the reference replays them.
struct Tiny<'a, D: Backend, R: Backend> {
    td: Tap<'a, D>,
    tr: Tap<'a, R>,
    dev: Llama<Tap<'a, D>>,
    re: Llama<Tap<'a, R>>,
    lora: HostLora,
    data: Vec<Example>,
}

pub fn run_all<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>, seed: u64) -> Result<()> {
    c.case(
        "e2e",
        "tiny llama: 2 layers, hidden 64, heads 4/2 x 16, vocab 300, LoRA r 8",
    );
    let cfg = tiny::config();
    let (td, tr) = (Tap::record(c.dev), Tap::replay(c.re));
    let t = Tiny {
        dev: Llama::new(&td, cfg.clone(), tiny::weights(&cfg, seed))?,
        re: Llama::new(&tr, cfg.clone(), tiny::weights(&cfg, seed))?,
        td,
        tr,
        lora: tiny::lora(&cfg, seed),
        data: tiny::examples(&cfg, seed),
    };
    gradients(c, &t)?;
    let penalties = curvature(c, &t, seed)?;
    training(c, &t, &penalties)
}

/// `name` without PEFT's fixed prefix and suffix: `layers.1.mlp.up_proj.lora_A`.
fn short(name: &str) -> String {
    let n = name.strip_prefix("base_model.model.model.").unwrap_or(name);
    n.strip_suffix(".weight").unwrap_or(n).to_string()
}

/// Every tensor of two adapters, paired by name.
fn lora_pairs<'a>(got: &'a HostLora, want: &'a HostLora) -> Vec<(String, &'a [f32], &'a [f32])> {
    got.named_tensors()
        .into_iter()
        .zip(want.named_tensors())
        .map(|((name, _, g), (_, _, w))| (short(&name), g, w))
        .collect()
}

fn gradients<D: Backend, R: Backend>(c: &mut Checker<'_, D, R>, t: &Tiny<'_, D, R>) -> Result<()> {
    c.case("e2e.grad", "5 sequences, summed loss");
    let (gd, ld) = summed_gradient(&t.td, &t.dev, &t.lora, &t.data)?;
    let (gr, lr) = summed_gradient(&t.tr, &t.re, &t.lora, &t.data)?;
    c.check_tensors("e2e.grad", "summed loss", &lora_pairs(&gd, &gr), EndToEnd);
    c.check_scalar("e2e.loss", "summed over 5 sequences", ld, lr, EndToEnd);
    Ok(())
}

/// The summed-loss gradient over all batches and the summed loss.
fn summed_gradient<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: &HostLora,
    data: &[Example],
) -> Result<(HostLora, f64)> {
    let l = lora.map(|v| be.buf(v.clone()))?;
    let mut grads = lora.map_sized(|n| be.zeros(n))?;
    let mut loss = 0f64;
    for batch in batches(data, BATCH) {
        loss += accumulate_gradients(be, model, &l, &batch, 1.0, &mut grads)?.loss_sum;
    }
    Ok((grads.map(|g| be.to_host(g))?, loss))
}

/// The curvature estimates the training steps penalise with (the reference's).
struct Penalties {
    diag: Curvature,
    kfac_tri: Curvature,
}

fn curvature<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    t: &Tiny<'_, D, R>,
    seed: u64,
) -> Result<Penalties> {
    use {Fisher::*, KfacApprox::*, Scheme::*};
    let (ld, lr) = (
        t.lora.map(|v| t.td.buf(v.clone()))?,
        t.lora.map(|v| t.tr.buf(v.clone()))?,
    );
    let mut one = |scheme, fisher, approx| -> Result<Curvature> {
        let spec = Spec {
            scheme,
            fisher,
            approx,
            seed,
        };
        let kernel = match (scheme, approx) {
            (Kfac, Reduce) => format!("e2e.curvature {scheme}/{fisher} reduce"),
            _ => format!("e2e.curvature {scheme}/{fisher}"),
        };
        let shapes = match fisher {
            Mc(_) => "5 sequences, the device's labels",
            Empirical => "5 sequences",
        };
        c.case(&kernel, shapes);
        let got = estimate(&t.td, &t.dev, &ld, &t.data, BATCH, spec, || {})?;
        t.tr.feed(t.td.take());
        let want = estimate(&t.tr, &t.re, &lr, &t.data, BATCH, spec, || {})?;
        if t.tr.pending() > 0 {
            return Err(Error::usage(
                "selftest: the reference used fewer Monte-Carlo draws than the device made",
            ));
        }
        let pairs: Vec<(String, &[f32], &[f32])> = tensors(&got)
            .into_iter()
            .zip(tensors(&want))
            .map(|((name, g), (_, w))| (name, g, w))
            .collect();
        c.check_tensors(&kernel, shapes, &pairs, EndToEnd);
        Ok(want)
    };
    let diag = one(Diag, Empirical, Expand)?;
    one(Diag, Mc(2), Expand)?;
    one(Kfac, Empirical, Expand)?;
    one(Kfac, Empirical, Reduce)?;
    one(Kfac, Mc(2), Expand)?;
    let kfac_tri = one(KfacTri, Empirical, Expand)?;
    one(KfacTri, Mc(2), Expand)?;
    Ok(Penalties { diag, kfac_tri })
}

/// Every tensor of a curvature estimate, named.
fn tensors(c: &Curvature) -> Vec<(String, &[f32])> {
    let mut out = Vec::new();
    if let Some(d) = &c.diag {
        for (name, _, data) in d.named_tensors() {
            out.push((format!("diag {}", short(&name)), data));
        }
    }
    if let Some(k) = &c.kfac {
        for (m, f) in c.mean.modules.iter().zip(k) {
            let p = short(&m.peft_path());
            let mut parts = vec![
                ("C_A", &f.a_in),
                ("G_A", &f.a_out),
                ("C_B", &f.b_in),
                ("G_B", &f.b_out),
            ];
            if let Some((ci, go)) = &f.cross {
                parts.extend([("C_AB", ci), ("G_AB", go)]);
            }
            for (what, data) in parts {
                out.push((format!("{what} {p}"), data.as_slice()));
            }
        }
    }
    out
}

fn training<D: Backend, R: Backend>(
    c: &mut Checker<'_, D, R>,
    t: &Tiny<'_, D, R>,
    p: &Penalties,
) -> Result<()> {
    let base = TrainConfig {
        steps: 3,
        batch_size: BATCH,
        // Adam's step is ~lr sign(g) where |g| >> eps: with the usual tiny eps, a gradient
        // entry near zero (or where the penalty cancels the loss gradient) takes a full
        // step in a direction rounding decides, amplifying rounding by |g| / eps. With eps
        // above the gradient entries (~1e-2 after clipping) the step is a smooth function
        // of the gradient, and lr = eps makes it ~10% of the weights, so that their f32
        // storage does not round it away.
        lr: 0.1,
        eps: 0.1,
        warmup_steps: 1,
        weight_decay: 0.01,
        ..TrainConfig::default()
    };
    // At lambda 30 each penalty changes every tensor's update by 10% (diag) to 50%
    // (kfac-tri) without dominating it (where penalty and loss gradient cancel, errors
    // are amplified again).
    let runs = [
        ("plain", None, 0.0),
        ("diag penalty", Some(&p.diag), 30.0),
        ("kfac-tri penalty", Some(&p.kfac_tri), 30.0),
    ];
    let opts = SessionOptions {
        quiet: true,
        ..SessionOptions::default()
    };
    for (what, curvature, lambda) in runs {
        let kernel = format!("e2e.train {what}");
        let shapes = format!("{} steps of {BATCH}, lambda {lambda}", base.steps);
        c.case(&kernel, &shapes);
        let cfg = TrainConfig {
            lambda,
            ..base.clone()
        };
        let (pd, pr) = match curvature {
            Some(c) => (
                Some(Penalty::new(&t.td, c.clone(), cfg.delta)?),
                Some(Penalty::new(&t.tr, c.clone(), cfg.delta)?),
            ),
            None => (None, None),
        };
        let got = session::run(&t.td, &t.dev, &t.data, &cfg, pd.as_ref(), &t.lora, &opts)?;
        let want = session::run(&t.tr, &t.re, &t.data, &cfg, pr.as_ref(), &t.lora, &opts)?;
        // The change from the init: the init itself (identical on both) would hide it.
        let (dg, dw) = (delta(&got.lora, &t.lora), delta(&want.lora, &t.lora));
        c.check_tensors(
            &kernel,
            &format!("{shapes}: update"),
            &lora_pairs(&dg, &dw),
            EndToEnd,
        );
        let mut metrics = vec![
            ("loss", series(&got, |m| m.loss), series(&want, |m| m.loss)),
            (
                "grad norm",
                series(&got, |m| m.grad_norm),
                series(&want, |m| m.grad_norm),
            ),
        ];
        if curvature.is_some() {
            metrics.push((
                "penalty",
                series(&got, |m| m.penalty),
                series(&want, |m| m.penalty),
            ));
        }
        let pairs: Vec<(String, &[f32], &[f32])> = metrics
            .iter()
            .map(|(n, g, w)| (n.to_string(), g.as_slice(), w.as_slice()))
            .collect();
        c.check_tensors(
            &kernel,
            &format!("{shapes}: per-step metrics"),
            &pairs,
            EndToEnd,
        );
    }
    Ok(())
}

/// One per-step metric of a run.
fn series(r: &SessionResult, f: fn(&StepMetrics) -> f64) -> Vec<f32> {
    r.metrics.iter().map(|m| f(m) as f32).collect()
}

/// `trained - init`, tensor by tensor.
fn delta(trained: &HostLora, init: &HostLora) -> HostLora {
    let mut d = trained.clone();
    for (x, (_, _, i)) in d.tensors_mut().zip(init.named_tensors()) {
        x.iter_mut().zip(i).for_each(|(a, b)| *a -= b);
    }
    d
}
