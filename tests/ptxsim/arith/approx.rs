//! The approximate functions and divisions against their documented error bounds
//! (9.7.3.13-22), and the f64 approx forms with .ftz.

use super::*;

fn ulp32(x: f64) -> f64 {
    let a = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (a.next_up() - a) as f64
}

#[test]
fn approx_functions_meet_their_documented_error_bounds() {
    // 9.7.3.13-22 and the table of each instruction: error bounds and special values
    let mut rng = Lcg(17);
    let xs = |rng: &mut Lcg, lo: f64, hi: f64, n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (hi - lo) * rng.unit()) as f32)
            .collect()
    };
    let run = |inst: &str, x: &[f32]| -> Vec<f32> {
        op32(
            inst,
            1,
            &x.iter().map(|&v| [f(v), 0, 0]).collect::<Vec<_>>(),
        )
        .into_iter()
        .map(fx)
        .collect()
    };
    // ex2: 2 ulp over the full range
    let x = xs(&mut rng, -120.0, 120.0, 200);
    for (inst, got) in [
        ("ex2.approx.f32", run("ex2.approx.f32", &x)),
        ("ex2.approx.ftz.f32", run("ex2.approx.ftz.f32", &x)),
    ] {
        for (&v, &r) in x.iter().zip(&got) {
            let want = (v as f64).exp2();
            if want < f32::MIN_POSITIVE as f64 && inst.contains("ftz") {
                continue;
            }
            assert!(
                (r as f64 - want).abs() <= 2.0 * ulp32(want),
                "{inst} {v}: {r:e} vs {want:e}"
            );
        }
    }
    // lg2: absolute 2^-22 in (0.5, 2), relative 2^-22 elsewhere
    let mut x = xs(&mut rng, 0.5, 2.0, 100);
    x.extend((0..100).map(|_| (2f64.powf(rng.unit() * 200.0 - 100.0)) as f32));
    for (&v, &r) in x.iter().zip(&run("lg2.approx.f32", &x)) {
        let want = (v as f64).log2();
        let bound = if v > 0.5 && v < 2.0 {
            2f64.powi(-22)
        } else {
            want.abs() * 2f64.powi(-22)
        };
        assert!(
            (r as f64 - want).abs() <= bound,
            "lg2 {v}: {r:e} vs {want:e}"
        );
    }
    // rcp: 1 ulp; rsqrt: relative 2^-22.9; sqrt.approx: relative 2^-23
    let x: Vec<f32> = (0..200)
        .map(|_| random_f32(&mut rng, -100, 100).abs())
        .collect();
    for ((&v, &rc), (&rs, &sq)) in x.iter().zip(&run("rcp.approx.f32", &x)).zip(
        run("rsqrt.approx.f32", &x)
            .iter()
            .zip(&run("sqrt.approx.f32", &x)),
    ) {
        let v = v as f64;
        assert!((rc as f64 - 1.0 / v).abs() <= ulp32(1.0 / v), "rcp {v:e}");
        assert!(
            (rs as f64 - 1.0 / v.sqrt()).abs() <= 2f64.powf(-22.9) / v.sqrt(),
            "rsqrt {v:e}"
        );
        assert!(
            (sq as f64 - v.sqrt()).abs() <= 2f64.powi(-23) * v.sqrt(),
            "sqrt {v:e}"
        );
    }
    // sin/cos: absolute 2^-20.5 in [-2pi, 2pi], 2^-14.7 in [-100pi, 100pi]
    let pi = std::f64::consts::PI;
    for (range, bound) in [(2.0 * pi, 2f64.powf(-20.5)), (100.0 * pi, 2f64.powf(-14.7))] {
        let x = xs(&mut rng, -range, range, 200);
        for ((&v, &s), &c) in x
            .iter()
            .zip(&run("sin.approx.f32", &x))
            .zip(&run("cos.approx.ftz.f32", &x))
        {
            assert!((s as f64 - (v as f64).sin()).abs() <= bound, "sin {v}");
            assert!((c as f64 - (v as f64).cos()).abs() <= bound, "cos {v}");
        }
    }
    // tanh (sm_75+): relative 2^-11, subnormals pass through
    let x = xs(&mut rng, -10.0, 10.0, 200);
    for (&v, &r) in x.iter().zip(&run("tanh.approx.f32", &x)) {
        let want = (v as f64).tanh();
        assert!(
            (r as f64 - want).abs() <= want.abs() * 2f64.powi(-11),
            "tanh {v}"
        );
    }
    // special values, from each instruction's table
    let inf = f32::INFINITY;
    let specials: [(&str, &[(f32, f32)]); 8] = [
        (
            "ex2.approx.f32",
            &[(-inf, 0.0), (0.0, 1.0), (-0.0, 1.0), (inf, inf)],
        ),
        (
            "lg2.approx.f32",
            &[
                (-inf, f32::NAN),
                (-1.0, f32::NAN),
                (0.0, -inf),
                (-0.0, -inf),
                (inf, inf),
            ],
        ),
        (
            "rcp.approx.f32",
            &[(-inf, -0.0), (-0.0, -inf), (0.0, inf), (inf, 0.0)],
        ),
        (
            "rsqrt.approx.f32",
            &[
                (-inf, f32::NAN),
                (-1.0, f32::NAN),
                (-0.0, -inf),
                (0.0, inf),
                (inf, 0.0),
            ],
        ),
        (
            "sqrt.approx.f32",
            &[
                (-inf, f32::NAN),
                (-1.0, f32::NAN),
                (-0.0, -0.0),
                (0.0, 0.0),
                (inf, inf),
            ],
        ),
        (
            "sin.approx.f32",
            &[(-inf, f32::NAN), (-0.0, -0.0), (0.0, 0.0)],
        ),
        (
            "cos.approx.f32",
            &[(inf, f32::NAN), (-0.0, 1.0), (0.0, 1.0)],
        ),
        (
            "tanh.approx.f32",
            &[(-inf, -1.0), (-0.0, -0.0), (inf, 1.0), (1e-40, 1e-40)],
        ),
    ];
    for (inst, cases) in specials {
        let x: Vec<f32> = cases.iter().map(|c| c.0).chain([f32::NAN]).collect();
        let got = run(inst, &x);
        for (&(v, want), &r) in cases.iter().zip(&got) {
            let same = (want.is_nan() && r.is_nan()) || want.to_bits() == r.to_bits();
            assert!(same, "{inst}({v:e}) = {r:e}, want {want:e}");
        }
        assert!(got.last().unwrap().is_nan(), "{inst}(NaN)");
    }
}

#[test]
fn div_approx_and_full_within_two_ulp_and_the_large_divisor_rule() {
    // 9.7.3.8: div.approx = a * (1/b), 2 ulp for |b| in [2^-126, 2^126]; for
    // 2^126 < |b| < 2^128 the result is zero (NaN if a is infinite); div.full: 2 ulp
    let mut rng = Lcg(23);
    let cases: Vec<[u32; 3]> = (0..200)
        .map(|_| {
            [
                f(random_f32(&mut rng, -60, 60)),
                f(random_f32(&mut rng, -60, 60)),
                0,
            ]
        })
        .collect();
    for inst in [
        "div.approx.f32",
        "div.full.f32",
        "div.approx.ftz.f32",
        "div.full.ftz.f32",
    ] {
        for (c, r) in cases.iter().zip(op32(inst, 2, &cases)) {
            let want = fx(c[0]) as f64 / fx(c[1]) as f64;
            assert!(
                (fx(r) as f64 - want).abs() <= 2.0 * ulp32(want),
                "{inst} {:e}/{:e}",
                fx(c[0]),
                fx(c[1])
            );
        }
    }
    let big = 2f32.powi(127);
    let got = op32(
        "div.approx.f32",
        2,
        &[
            [f(1.0), f(big), 0],
            [f(-3.0), f(big), 0],
            [f(1.0), f(-big), 0],
            [f(f32::INFINITY), f(big), 0],
        ],
    );
    assert_eq!(got[..3], [f(0.0), f(-0.0), f(-0.0)]);
    assert!(fx(got[3]).is_nan());
    // div.full has no such rule
    let got = op32("div.full.f32", 2, &[[f(1.0), f(big), 0]]);
    assert_eq!(fx(got[0]), 2f32.powi(-127));
}

#[test]
fn f64_approx_ftz_forms_work_on_the_upper_word() {
    // 9.7.3.14 rcp.approx.ftz.f64: d[63:32] = approx(1 / a[63:32]), d[31:0] = 0
    let d = |x: f64| x.to_bits();
    let cases = [
        [d(3.0), 0, 0],
        [d(-0.1), 0, 0],
        [d(1e300), 0, 0],
        [d(f64::NAN), 0, 0],
        [d(0.0), 0, 0],
    ];
    let got = run_op("rcp.approx.ftz.f64 %d0, %s0", &[R::B64], &[R::B64], &cases);
    for (c, g) in cases.iter().zip(&got).take(3) {
        let (x, r) = (f64::from_bits(c[0]), g[0]);
        assert_eq!(r & 0xffff_ffff, 0, "low word of rcp({x})");
        assert!(
            (f64::from_bits(r) - 1.0 / x).abs() <= (1.0 / x).abs() * 2f64.powi(-19),
            "rcp({x})"
        );
    }
    assert_eq!(
        got[3][0], 0x7fff_ffff_0000_0000,
        "NaN gives the canonical NaN"
    );
    assert_eq!(f64::from_bits(got[4][0]), f64::INFINITY);
    let got = run_op(
        "rcp.rn.f64 %d0, %s0",
        &[R::B64],
        &[R::B64],
        &[[d(3.0), 0, 0]],
    );
    assert_eq!(f64::from_bits(got[0][0]), 1.0 / 3.0);
}
