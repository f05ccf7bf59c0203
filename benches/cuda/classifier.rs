//! The fused classifier against materialised logits.

use super::*;

/// The LM head with its loss and gradient: the fused classifier (vocabulary chunks) against
/// the materialised sequence (`linear` to the full f32 logits, `cross_entropy`,
/// `linear_backward`). Inputs rounded to bf16 as the device reads them, so the simulator
/// check against the CPU measures the kernels, not the rounding of the inputs.
pub(crate) fn classifier(mode: &mut Mode, g: &CudaBackend, sh: &Shapes) {
    let (rows, dim, vocab) = sh.classifier;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let bf = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let hh = bf(rnd(&mut rng, rows * dim, 1.0));
    let hw = bf(rnd(&mut rng, vocab * dim, 0.05));
    let labels: Vec<i32> = (0..rows).map(|r| (r * 7919 % vocab) as i32).collect();
    let want = if mode.sim() {
        let t = CeTargets::Labels(&labels);
        let c = CpuBackend::new(2);
        let cw = c.weight(hw.clone(), vocab, dim).unwrap();
        let o = c
            .classifier(&hh, &cw, rows, dim, vocab, t, Some(1.0))
            .unwrap();
        vec![("losses", o.losses), ("dhidden", o.dhidden.unwrap())]
    } else {
        vec![]
    };
    let want = Rc::new(want);
    // Outputs are read back only where they are checked: the timed calls stay on the device.
    let check = mode.sim();
    let (h, w) = (g.buf(hh).unwrap(), g.weight(hw, vocab, dim).unwrap());
    let res: RefCell<Vec<Vec<f32>>> = RefCell::new(vec![]);
    let (res, labels, h, w) = (&res, &labels, &h, &w);
    let got: Rc<dyn Fn() -> Outs> = Rc::new(move || {
        let r = res.borrow();
        vec![("losses", r[0].clone()), ("dhidden", r[1].clone())]
    });
    let fused: Call = Rc::new(move || {
        let t = CeTargets::Labels(labels);
        let o = g.classifier(h, w, rows, dim, vocab, t, Some(1.0)).unwrap();
        if let (true, Some(d)) = (check, o.dhidden) {
            *res.borrow_mut() = vec![o.losses, down(g, &d)];
        }
    });
    let materialised: Call = Rc::new(move || {
        let t = CeTargets::Labels(labels);
        let z = g.linear(h, w, rows, dim, vocab).unwrap();
        let (l, d) = g.cross_entropy(&z, rows, vocab, t, Some(1.0)).unwrap();
        let mut dh = g.zeros(rows * dim).unwrap();
        g.linear_backward(&d.unwrap(), w, rows, dim, vocab, &mut dh, false)
            .unwrap();
        if check {
            *res.borrow_mut() = vec![l, down(g, &dh)];
        }
    });
    let work = roofline::classifier(rows, dim, vocab);
    let variant = |name: &str, call, bound| Variant {
        name: name.into(),
        work,
        call,
        got: got.clone(),
        want: want.clone(),
        bound,
    };
    mode.run(
        g,
        Group {
            name: format!("{}_classifier_{rows}x{dim}x{vocab}", sh.prefix),
            sample_size: Some(10),
            reset: Rc::new(|| res.borrow_mut().clear()),
            variants: vec![
                variant("fused", fused, TC_BOUND),
                variant("materialised", materialised, TC_BOUND),
            ],
        },
    );
}
