//! 7. Arithmetic semantics against known values (9.7.1-9.7.4, 9.7.8, 9.7.9.21 cvt)

use super::*;

mod approx;
mod cvt;
mod int;

/// Register classes of an operand of the instruction under test.
#[derive(Clone, Copy)]
enum R {
    B16,
    B32,
    B64,
    Pred,
}

impl R {
    fn decl(self) -> &'static str {
        match self {
            R::B16 => ".b16",
            R::B32 => ".b32",
            R::B64 => ".b64",
            R::Pred => ".pred",
        }
    }
    /// Move the 64-bit input `%x{i}` into source register `%s{i}`.
    fn load(self, i: usize) -> String {
        match self {
            R::B16 => format!("cvt.u16.u64 %s{i}, %x{i};"),
            R::B32 => format!("cvt.u32.u64 %s{i}, %x{i};"),
            R::B64 => format!("mov.b64 %s{i}, %x{i};"),
            R::Pred => format!("setp.ne.u64 %s{i}, %x{i}, 0;"),
        }
    }
    /// Move destination `%d{i}` into the 64-bit `%y{i}`.
    fn store(self, i: usize) -> String {
        match self {
            R::B16 => format!("cvt.u64.u16 %y{i}, %d{i};"),
            R::B32 => format!("cvt.u64.u32 %y{i}, %d{i};"),
            R::B64 => format!("mov.b64 %y{i}, %d{i};"),
            R::Pred => format!("selp.u64 %y{i}, 1, 0, %d{i};"),
        }
    }
}

/// Run `inst` (operands written `%d0`, `%d1`, `%s0`, `%s1`, `%s2`) once per case, one
/// thread each; inputs and outputs as raw 64-bit patterns.
fn run_op(inst: &str, dsts: &[R], srcs: &[R], cases: &[[u64; 3]]) -> Vec<Vec<u64>> {
    let mut body = String::from(
        ".visible .entry op(.param .u64 pin, .param .u64 pout, .param .u32 n)\n{\n\
         .reg .pred %p;\n.reg .b32 %t<4>;\n.reg .b64 %x<3>, %y<2>, %a<4>;\n",
    );
    for (i, r) in srcs.iter().enumerate() {
        body += &format!(".reg {} %s{i};\n", r.decl());
    }
    for (i, r) in dsts.iter().enumerate() {
        body += &format!(".reg {} %d{i};\n", r.decl());
    }
    body += "mov.u32 %t0, %tid.x;\nmov.u32 %t1, %ctaid.x;\nmov.u32 %t2, %ntid.x;\nmad.lo.u32 %t0, %t1, %t2, %t0;\n\
             ld.param.u32 %t3, [n];\nsetp.ge.u32 %p, %t0, %t3;\n@%p bra $END;\n\
             ld.param.u64 %a0, [pin];\nld.param.u64 %a1, [pout];\nmul.wide.u32 %a2, %t0, 24;\nadd.u64 %a2, %a0, %a2;\n";
    for i in 0..3 {
        body += &format!("ld.global.u64 %x{i}, [%a2+{}];\n", 8 * i);
    }
    for (i, r) in srcs.iter().enumerate() {
        body += &r.load(i);
        body.push('\n');
    }
    body += inst;
    body += ";\n";
    for (i, r) in dsts.iter().enumerate() {
        body += &r.store(i);
        body.push('\n');
    }
    body += "mul.wide.u32 %a3, %t0, 16;\nadd.u64 %a3, %a1, %a3;\nst.global.v2.u64 [%a3], {%y0, %y1};\n$END:\nret;\n}\n";
    if dsts.len() == 1 {
        body = body.replace(
            "st.global.v2.u64 [%a3], {%y0, %y1};",
            "st.global.u64 [%a3], %y0;",
        );
    }
    let d = dev();
    let flat: Vec<u64> = cases.iter().flatten().copied().collect();
    let gi = up(&d, &flat);
    let go = zeros::<u64>(&d, 2 * cases.len());
    let n = cases.len() as u32;
    let ptx = sm80(&body);
    if let Err(e) = launch(
        &d,
        &ptx,
        "op",
        cfg(n.div_ceil(128), 128),
        &[p(gi), p(go), Arg::I32(n as i32)],
    ) {
        panic!("`{inst}`: {e}");
    }
    let out: Vec<u64> = down(&d, go, 2 * cases.len());
    out.chunks(2).map(|c| c[..dsts.len()].to_vec()).collect()
}

/// One 32-bit result per case for `op.type %d0, %s0[, %s1[, %s2]]`.
fn op32(inst: &str, nsrc: usize, cases: &[[u32; 3]]) -> Vec<u32> {
    let srcs = vec![R::B32; nsrc];
    let ops = (0..nsrc)
        .map(|i| format!("%s{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let c: Vec<[u64; 3]> = cases.iter().map(|c| c.map(|x| x as u64)).collect();
    run_op(&format!("{inst} %d0, {ops}"), &[R::B32], &srcs, &c)
        .iter()
        .map(|r| r[0] as u32)
        .collect()
}

fn f(x: f32) -> u32 {
    x.to_bits()
}

fn fx(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// The exact value of an operation as an unevaluated sum `s + e` of two f64.
#[derive(Clone, Copy, Debug)]
struct Exact(f64, f64);

impl Exact {
    /// `r` compared with the exact value (`r - s` is exact: `r` is within a factor 2 of `s`).
    fn cmp(self, r: f64) -> std::cmp::Ordering {
        if r == self.0 {
            return 0.0f64.partial_cmp(&self.1).unwrap();
        }
        let d = r - self.0;
        assert_eq!(d + self.0, r, "inexact comparison");
        d.partial_cmp(&self.1).unwrap()
    }
}

fn two_sum(a: f64, b: f64) -> Exact {
    let s = a + b;
    let bb = s - a;
    Exact(s, (a - (s - bb)) + (b - bb))
}

/// Check that `r` is the f32 rounding of the exact value under `mode` (IEEE 754 4.3).
fn check_rounding(mode: &str, r: f32, x: Exact, what: &str) {
    use std::cmp::Ordering::*;
    let (lo, hi) = match x.cmp(r as f64) {
        Equal => return,
        Less => (r, r.next_up()),
        Greater => (r.next_down(), r),
    };
    // the exact value lies strictly between two neighbouring f32 values
    assert_eq!(
        x.cmp(lo as f64),
        Less,
        "{what}: {mode} result {r:e} is not adjacent to the exact value"
    );
    assert_eq!(
        x.cmp(hi as f64),
        Greater,
        "{what}: {mode} result {r:e} is not adjacent to the exact value"
    );
    let negative = hi <= 0.0;
    let want = match mode {
        "rm" => lo,
        "rp" => hi,
        "rz" if negative => hi,
        "rz" => lo,
        _ => {
            let mid = lo as f64 / 2.0 + hi as f64 / 2.0;
            match x.cmp(mid) {
                Greater => lo,
                Less => hi,
                Equal if lo.to_bits() % 2 == 0 => lo,
                Equal => hi,
            }
        }
    };
    assert_eq!(
        r.to_bits(),
        want.to_bits(),
        "{what}: .{mode} gives {r:e}, want {want:e}"
    );
}

fn random_f32(rng: &mut Lcg, emin: i32, emax: i32) -> f32 {
    let m = 1.0 + rng.unit();
    let e = rng.int(emin as i64, emax as i64) as i32;
    let s = if rng.next().is_multiple_of(2) {
        1.0
    } else {
        -1.0
    };
    (s * m * 2f64.powi(e)) as f32
}

#[test]
fn f32_add_mul_fma_div_sqrt_round_in_every_mode() {
    // 9.7.3: with .rn .rz .rm .rp the result is the IEEE rounding of the exact value
    let mut rng = Lcg(11);
    let cases: Vec<[u32; 3]> = (0..256)
        .map(|_| [0; 3].map(|_| f(random_f32(&mut rng, -20, 20))))
        .chain([
            [f(1.0), f(2f32.powi(-30)), 0],
            [f(1.0), f(3.0), f(-1.0 / 3.0)],
            [f(0.1), f(0.2), f(0.3)],
        ])
        .collect();
    let roots: Vec<[u32; 3]> = cases
        .iter()
        .map(|c| [c[0] & 0x7fff_ffff, 0, 0])
        .chain([[f(2.0), 0, 0]])
        .collect();
    for mode in ["rn", "rz", "rm", "rp"] {
        let add = op32(&format!("add.{mode}.f32"), 2, &cases);
        let sub = op32(&format!("sub.{mode}.f32"), 2, &cases);
        let mul = op32(&format!("mul.{mode}.f32"), 2, &cases);
        let fma = op32(&format!("fma.{mode}.f32"), 3, &cases);
        let div = op32(&format!("div.{mode}.f32"), 2, &cases);
        let sqrt = op32(&format!("sqrt.{mode}.f32"), 1, &roots);
        for (i, c) in cases.iter().enumerate() {
            let (a, b, cc) = (fx(c[0]) as f64, fx(c[1]) as f64, fx(c[2]) as f64);
            check_rounding(mode, fx(add[i]), two_sum(a, b), &format!("{a:e} + {b:e}"));
            check_rounding(mode, fx(sub[i]), two_sum(a, -b), &format!("{a:e} - {b:e}"));
            check_rounding(
                mode,
                fx(mul[i]),
                Exact(a * b, 0.0),
                &format!("{a:e} * {b:e}"),
            );
            check_rounding(
                mode,
                fx(fma[i]),
                two_sum(a * b, cc),
                &format!("fma({a:e}, {b:e}, {cc:e})"),
            );
            // q against a / b: the sign of q b - a (exact in f64), times the sign of b
            let side = |q: f32| {
                let t = (q as f64 * b).partial_cmp(&a).unwrap();
                if b < 0.0 { t.reverse() } else { t }
            };
            check_bracket(
                mode,
                fx(div[i]),
                side,
                (a / b) as f32,
                &format!("{a:e} / {b:e}"),
            );
        }
        for (i, c) in roots.iter().enumerate() {
            let a = fx(c[0]) as f64;
            let side = |r: f32| (r as f64 * r as f64).partial_cmp(&a).unwrap();
            check_bracket(
                mode,
                fx(sqrt[i]),
                side,
                a.sqrt() as f32,
                &format!("sqrt({a:e})"),
            );
        }
    }
    // known values: 1 + 2^-30 is between 1 and 1 + 2^-23
    let one_up = op32("add.rp.f32", 2, &[[f(1.0), f(2f32.powi(-30)), 0]]);
    assert_eq!(fx(one_up[0]), 1.0f32.next_up());
    let third = op32("div.rz.f32", 2, &[[f(-1.0), f(3.0), 0]]);
    assert_eq!(fx(third[0]), (-1.0f32 / 3.0).next_up(), "-1/3 toward zero");
}

/// `r` rounds the exact value under `mode`, where `side(y)` compares `y` with it, and
/// `nearest` is the round-to-nearest result (for division and square root the f64
/// result rounded to f32 is correctly rounded: 53 >= 2 * 24 + 2 bits).
fn check_bracket(
    mode: &str,
    r: f32,
    side: impl Fn(f32) -> std::cmp::Ordering,
    nearest: f32,
    what: &str,
) {
    use std::cmp::Ordering::*;
    if mode == "rn" {
        assert_eq!(r.to_bits(), nearest.to_bits(), "{what}: .rn");
        return;
    }
    let (lo, hi) = match side(r) {
        Equal => return,
        Less => (r, r.next_up()),
        Greater => (r.next_down(), r),
    };
    assert_eq!(
        (side(lo), side(hi)),
        (Less, Greater),
        "{what}: .{mode} result {r:e} is not adjacent to the exact value"
    );
    let want = match mode {
        "rm" => lo,
        "rp" => hi,
        _ if hi <= 0.0 => hi,
        _ => lo,
    };
    assert_eq!(
        r.to_bits(),
        want.to_bits(),
        "{what}: .{mode} gives {r:e}, want {want:e}"
    );
}

#[test]
fn ftz_flushes_subnormal_inputs_and_results_to_signed_zero() {
    // 9.7.3 intro: .ftz flushes subnormal inputs and results to sign-preserving zero
    let sub = 1e-40f32;
    let tiny = 2f32.powi(-127); // subnormal; its reciprocal 2^127 is finite
    let cases = [
        ("add.ftz.f32", [f(sub), f(0.0), 0], f(0.0)),
        ("add.ftz.f32", [f(-sub), f(-0.0), 0], f(-0.0)),
        ("add.f32", [f(sub), f(0.0), 0], f(sub)),
        ("mul.ftz.f32", [f(1e-20), f(1e-20), 0], f(0.0)),
        (
            "mul.rn.f32",
            [f(1e-20), f(1e-20), 0],
            f(1e-20f32 * 1e-20f32),
        ),
        ("mul.ftz.f32", [f(-sub), f(2f32.powi(100)), 0], f(-0.0)),
        ("fma.rn.ftz.f32", [f(sub), f(1.0), f(1.0)], f(1.0)),
        ("min.ftz.f32", [f(-sub), f(0.0), 0], f(-0.0)),
        ("sqrt.rn.ftz.f32", [f(sub), 0, 0], f(0.0)),
        ("rcp.rn.f32", [f(tiny), 0, 0], f(2f32.powi(127))),
        ("rcp.approx.ftz.f32", [f(tiny), 0, 0], f(f32::INFINITY)),
        ("rcp.approx.ftz.f32", [f(-tiny), 0, 0], f(f32::NEG_INFINITY)),
        ("ex2.approx.ftz.f32", [f(-sub), 0, 0], f(1.0)),
    ];
    for (inst, c, want) in cases {
        let n = if inst.starts_with("fma") {
            3
        } else if inst.starts_with("add") || inst.starts_with("mul") || inst.starts_with("min") {
            2
        } else {
            1
        };
        assert_eq!(op32(inst, n, &[c])[0], want, "{inst} {c:x?}");
    }
    let ordered = run_op(
        "setp.lt.ftz.f32 %d0, %s0, %s1",
        &[R::Pred],
        &[R::B32, R::B32],
        &[[f(sub) as u64, 0, 0]],
    );
    let plain = run_op(
        "setp.lt.f32 %d0, %s1, %s0",
        &[R::Pred],
        &[R::B32, R::B32],
        &[[f(sub) as u64, 0, 0]],
    );
    assert_eq!(
        (ordered[0][0], plain[0][0]),
        (0, 1),
        "setp.ftz compares flushed inputs"
    );
}

#[test]
fn sat_clamps_to_zero_one_and_sends_nan_to_zero() {
    let cases = [
        ("add.sat.f32", 2, [f(0.7), f(0.6), 0], f(1.0)),
        ("add.sat.f32", 2, [f(-0.5), f(0.1), 0], f(0.0)),
        ("add.sat.f32", 2, [f(0.25), f(0.5), 0], f(0.75)),
        (
            "add.sat.f32",
            2,
            [f(f32::INFINITY), f(f32::NEG_INFINITY), 0],
            f(0.0),
        ),
        ("mul.sat.f32", 2, [f(3.0), f(0.5), 0], f(1.0)),
        ("fma.rn.sat.f32", 3, [f(2.0), f(2.0), f(-10.0)], f(0.0)),
        ("fma.rn.sat.f32", 3, [f(0.5), f(0.5), f(0.25)], f(0.5)),
        ("sub.rz.sat.f32", 2, [f(0.1), f(f32::NAN), 0], f(0.0)),
    ];
    for (inst, n, c, want) in cases {
        assert_eq!(op32(inst, n, &[c])[0], want, "{inst} {c:x?}");
    }
}

#[test]
fn min_max_nan_rules_and_signed_zeros() {
    // 9.7.3.11-12: a single NaN operand gives the other one; both NaN give NaN; .NaN
    // propagates; -0 < +0 whatever the operand order
    let nan = f(f32::NAN);
    let pairs = [
        [nan, f(2.0), 0],
        [f(2.0), nan, 0],
        [nan, nan, 0],
        [f(-0.0), f(0.0), 0],
        [f(0.0), f(-0.0), 0],
        [f(-3.0), f(1.0), 0],
        [f(f32::NEG_INFINITY), f(1.0), 0],
    ];
    let min = op32("min.f32", 2, &pairs);
    let max = op32("max.f32", 2, &pairs);
    let min_nan = op32("min.NaN.f32", 2, &pairs);
    let max_nan = op32("max.NaN.f32", 2, &pairs);
    assert_eq!(min[..2], [f(2.0), f(2.0)]);
    assert_eq!(max[..2], [f(2.0), f(2.0)]);
    assert!(fx(min[2]).is_nan() && fx(max[2]).is_nan());
    assert_eq!((min[3], min[4]), (f(-0.0), f(-0.0)));
    assert_eq!((max[3], max[4]), (f(0.0), f(0.0)));
    assert_eq!(
        (min[5], max[5], min[6], max[6]),
        (f(-3.0), f(1.0), f(f32::NEG_INFINITY), f(1.0))
    );
    assert!(
        min_nan[..3]
            .iter()
            .chain(&max_nan[..3])
            .all(|&x| fx(x).is_nan()),
        "min.NaN/max.NaN"
    );
    assert_eq!((min_nan[5], max_nan[5]), (f(-3.0), f(1.0)));
    // f64 follows the same rules
    let d = |x: f64| x.to_bits();
    let r = run_op(
        "min.f64 %d0, %s0, %s1",
        &[R::B64],
        &[R::B64, R::B64],
        &[[d(f64::NAN), d(-2.5), 0], [d(0.0), d(-0.0), 0]],
    );
    assert_eq!((r[0][0], r[1][0]), (d(-2.5), d(-0.0)));
}

#[test]
fn setp_ordered_unordered_and_combined_predicates() {
    // 9.7.6.1: ordered comparisons are false with a NaN operand (ne too); the unordered
    // ones are true; num/nan test for NaN
    let nan = f32::NAN;
    let vals = [
        (1.0f32, 2.0f32),
        (2.0, 2.0),
        (3.0, 2.0),
        (nan, 2.0),
        (2.0, nan),
        (-0.0, 0.0),
    ];
    for cmp in [
        "eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan",
    ] {
        let cases: Vec<[u64; 3]> = vals
            .iter()
            .map(|&(a, b)| [f(a) as u64, f(b) as u64, 0])
            .collect();
        let got = run_op(
            &format!("setp.{cmp}.f32 %d0|%d1, %s0, %s1"),
            &[R::Pred, R::Pred],
            &[R::B32, R::B32],
            &cases,
        );
        for (&(a, b), g) in vals.iter().zip(&got) {
            let unordered = a.is_nan() || b.is_nan();
            let ordered = |c: &str| match c {
                "eq" => a == b,
                "ne" => !unordered && a != b,
                "lt" => a < b,
                "le" => a <= b,
                "gt" => a > b,
                _ => a >= b,
            };
            let want = match cmp {
                "num" => !unordered,
                "nan" => unordered,
                _ if cmp.len() == 3 => unordered || ordered(&cmp[..2]),
                _ => ordered(cmp),
            };
            assert_eq!(
                (g[0], g[1]),
                (want as u64, !want as u64),
                "setp.{cmp} {a} {b}"
            );
        }
    }
    // p = (a > b) AND !c, q = !(a > b) AND !c
    let cases: Vec<[u64; 3]> = [
        (3.0f32, 2.0f32, 0u64),
        (3.0, 2.0, 1),
        (1.0, 2.0, 0),
        (1.0, 2.0, 1),
    ]
    .iter()
    .map(|&(a, b, c)| [f(a) as u64, f(b) as u64, c])
    .collect();
    let got = run_op(
        "setp.gt.and.f32 %d0|%d1, %s0, %s1, !%s2",
        &[R::Pred, R::Pred],
        &[R::B32, R::B32, R::Pred],
        &cases,
    );
    assert_eq!(got, [vec![1, 0], vec![0, 0], vec![0, 1], vec![0, 0]]);
    // integer comparisons: signed, unsigned aliases
    let got = run_op(
        "setp.lt.s32 %d0|%d1, %s0, %s1",
        &[R::Pred, R::Pred],
        &[R::B32, R::B32],
        &[[0xffff_ffff, 0, 0]],
    );
    assert_eq!(got[0], [1, 0]);
    let got = run_op(
        "setp.lo.u32 %d0|%d1, %s0, %s1",
        &[R::Pred, R::Pred],
        &[R::B32, R::B32],
        &[[0xffff_ffff, 0, 0]],
    );
    assert_eq!(got[0], [0, 1]);
}

#[test]
fn testp_classes_and_copysign_operand_order() {
    // 9.7.3.1 testp: zeros count as normal
    let vals = [
        0.0f32,
        -0.0,
        1.5,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let cases: Vec<[u64; 3]> = vals.iter().map(|&x| [f(x) as u64, 0, 0]).collect();
    let want: [(&str, [u64; 7]); 6] = [
        ("finite", [1, 1, 1, 1, 0, 0, 0]),
        ("infinite", [0, 0, 0, 0, 1, 1, 0]),
        ("number", [1, 1, 1, 1, 1, 1, 0]),
        ("notanumber", [0, 0, 0, 0, 0, 0, 1]),
        ("normal", [1, 1, 1, 0, 0, 0, 0]),
        ("subnormal", [0, 0, 0, 1, 0, 0, 0]),
    ];
    for (kind, w) in want {
        let got: Vec<u64> = run_op(
            &format!("testp.{kind}.f32 %d0, %s0"),
            &[R::Pred],
            &[R::B32],
            &cases,
        )
        .iter()
        .map(|r| r[0])
        .collect();
        assert_eq!(got, w, "testp.{kind}");
    }
    // 9.7.3.2: copysign d, a, b copies the sign of a onto b
    let got = op32(
        "copysign.f32",
        2,
        &[
            [f(-1.0), f(2.0), 0],
            [f(1.0), f(-2.0), 0],
            [f(-0.0), f(f32::INFINITY), 0],
        ],
    );
    assert_eq!(got, [f(-2.0), f(2.0), f(f32::NEG_INFINITY)]);
    let d = |x: f64| x.to_bits();
    let got = run_op(
        "copysign.f64 %d0, %s0, %s1",
        &[R::B64],
        &[R::B64, R::B64],
        &[[d(-3.0), d(0.5), 0]],
    );
    assert_eq!(got[0][0], d(-0.5));
}

#[test]
fn directed_rounding_at_binade_boundaries_signed_zeros_and_overflow() {
    let e60 = 2f32.powi(-60);
    let below_one = 1.0 - 2f32.powi(-24); // the largest f32 below 1
    // an exact value just below a power of two rounds within the binade below it
    assert_eq!(
        op32("add.rz.f32", 2, &[[f(1.0), f(-e60), 0]])[0],
        f(below_one)
    );
    assert_eq!(
        op32("add.rm.f32", 2, &[[f(1.0), f(-e60), 0]])[0],
        f(below_one)
    );
    assert_eq!(op32("add.rp.f32", 2, &[[f(1.0), f(-e60), 0]])[0], f(1.0));
    assert_eq!(
        op32("add.rp.f32", 2, &[[f(-1.0), f(e60), 0]])[0],
        f(-below_one)
    );
    assert_eq!(
        op32("fma.rz.f32", 3, &[[f(1.0), f(1.0), f(-e60)]])[0],
        f(below_one)
    );
    let r = run_op(
        "cvt.rz.f32.f64 %d0, %s0",
        &[R::B32],
        &[R::B64],
        &[[(1.0 - 2f64.powi(-40)).to_bits(), 0, 0]],
    );
    assert_eq!(r[0][0], f(below_one) as u64);
    // IEEE 754 6.3: an exact zero sum is +0, but -0 when rounding toward -inf; x + x keeps
    // the sign of x
    let zeros = [
        ("add.rm.f32", [f(1.0), f(-1.0), 0], f(-0.0)),
        ("add.rz.f32", [f(1.0), f(-1.0), 0], f(0.0)),
        ("add.rp.f32", [f(-0.0), f(-0.0), 0], f(-0.0)),
        ("add.rz.f32", [f(-0.0), f(-0.0), 0], f(-0.0)),
        ("add.rm.f32", [f(0.0), f(0.0), 0], f(0.0)),
        ("sub.rm.f32", [f(2.0), f(2.0), 0], f(-0.0)),
        ("sub.rz.f32", [f(-0.0), f(0.0), 0], f(-0.0)),
        ("cvt.rzi.f32.f32", [f(-0.5), 0, 0], f(-0.0)),
    ];
    for (inst, c, want) in zeros {
        let n = if inst.starts_with("cvt") { 1 } else { 2 };
        assert_eq!(op32(inst, n, &[c])[0], want, "{inst} {:?}", c.map(fx));
    }
    assert_eq!(
        op32("fma.rm.f32", 3, &[[f(2.0), f(3.0), f(-6.0)]])[0],
        f(-0.0)
    );
    let h = run_op(
        "cvt.rn.f16.f32 %d0, %s0",
        &[R::B16],
        &[R::B32],
        &[[f(-0.0) as u64, 0, 0]],
    );
    assert_eq!(h[0][0], 0x8000, "-0 converts to -0");
    // f64: overflow rounds toward zero to the largest finite value; a division by zero
    // is an exact infinity
    let d = |x: f64| x.to_bits();
    let f64op = |inst: &str, a: f64, b: f64| {
        f64::from_bits(
            run_op(
                &format!("{inst} %d0, %s0, %s1"),
                &[R::B64],
                &[R::B64, R::B64],
                &[[d(a), d(b), 0]],
            )[0][0],
        )
    };
    let max = f64::MAX;
    assert_eq!(f64op("add.rz.f64", max, max), max);
    assert_eq!(f64op("add.rm.f64", max, max), max);
    assert_eq!(f64op("add.rp.f64", max, max), f64::INFINITY);
    assert_eq!(f64op("add.rm.f64", -max, -max), f64::NEG_INFINITY);
    assert_eq!(f64op("add.rp.f64", -max, -max), -max);
    assert_eq!(f64op("mul.rz.f64", 1e300, -1e300), -max);
    assert_eq!(f64op("div.rz.f64", 1.0, 0.0), f64::INFINITY);
    assert_eq!(f64op("add.rn.f64", max, max), f64::INFINITY);
    assert_eq!(f64op("add.rm.f64", 1.0, -1.0).to_bits(), d(-0.0));
    assert_eq!(f64op("add.rz.f64", 1.0, -1.0).to_bits(), d(0.0));
    assert_eq!(f64op("add.rz.f64", 1.0, 2f64.powi(-60)), 1.0);
    assert_eq!(f64op("add.rp.f64", 1.0, 2f64.powi(-60)), 1.0f64.next_up());
    assert_eq!(
        f64op("div.rm.f64", 1.0, 3.0),
        1.0 / 3.0,
        "1/3 rounds down to nearest"
    );
    assert_eq!(f64op("div.rp.f64", 1.0, 3.0), (1.0f64 / 3.0).next_up());
    assert_eq!(f64op("sub.rm.f64", 1.0, 2f64.powi(-60)), 1.0f64.next_down());
}

/// The ulp of f32 at `x` (the gap above |x| rounded to f32).
#[test]
fn half_precision_arithmetic_rounds_once_to_nearest() {
    // 9.7.4: f16/bf16 add, mul, fma (.rn) round the exact result once
    let mut rng = Lcg(31);
    let h = |x: f64| half::f16::from_f64(x);
    let b = |x: f64| half::bf16::from_f64(x);
    let mut cases: Vec<[u64; 3]> = Vec::new();
    for _ in 0..128 {
        let v = [0; 3].map(|_| (rng.unit() * 16.0 - 8.0) * 2f64.powi(rng.int(-6, 6) as i32));
        cases.push([
            h(v[0]).to_bits() as u64,
            h(v[1]).to_bits() as u64,
            h(v[2]).to_bits() as u64,
        ]);
    }
    // ties: 1 + 2^-11 is half an f16 ulp above 1
    cases.push([
        h(1.0).to_bits() as u64,
        h(2f64.powi(-11)).to_bits() as u64,
        0,
    ]);
    let f16 = |x: u64| half::f16::from_bits(x as u16).to_f64();
    let run = |inst: &str, n: usize| -> Vec<u64> {
        let ops = (0..n)
            .map(|i| format!("%s{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        run_op(
            &format!("{inst} %d0, {ops}"),
            &[R::B16],
            &vec![R::B16; n],
            &cases,
        )
        .iter()
        .map(|r| r[0])
        .collect()
    };
    let (add, mul, fma) = (
        run("add.rn.f16", 2),
        run("mul.rn.f16", 2),
        run("fma.rn.f16", 3),
    );
    for (i, c) in cases.iter().enumerate() {
        let (x, y, z) = (f16(c[0]), f16(c[1]), f16(c[2]));
        assert_eq!(add[i] as u16, h(x + y).to_bits(), "add.f16 {x} {y}");
        assert_eq!(mul[i] as u16, h(x * y).to_bits(), "mul.f16 {x} {y}");
        assert_eq!(fma[i] as u16, h(x * y + z).to_bits(), "fma.f16 {x} {y} {z}");
    }
    assert_eq!(add[128] as u16, h(1.0).to_bits(), "tie to even");
    // f16 overflow and packed f16x2 (element 0 in the low half)
    let r = run_op(
        "mul.rn.f16 %d0, %s0, %s1",
        &[R::B16],
        &[R::B16; 2],
        &[[h(300.0).to_bits() as u64, h(300.0).to_bits() as u64, 0]],
    );
    assert_eq!(r[0][0], 0x7c00);
    let pack = |lo: f64, hi: f64| (h(lo).to_bits() as u64) | (h(hi).to_bits() as u64) << 16;
    let r = run_op(
        "add.rn.f16x2 %d0, %s0, %s1",
        &[R::B32],
        &[R::B32; 2],
        &[[pack(1.5, -2.0), pack(0.25, 8.0), 0]],
    );
    assert_eq!(r[0][0], pack(1.75, 6.0));
    // bf16 fma (sm_80) and add (sm_90)
    let bcases: Vec<[u64; 3]> = (0..64)
        .map(|_| {
            [0; 3].map(|_| {
                b((rng.unit() * 64.0 - 32.0) * 2f64.powi(rng.int(-20, 20) as i32)).to_bits() as u64
            })
        })
        .collect();
    let bf = |x: u64| half::bf16::from_bits(x as u16).to_f64();
    let fma = run_op(
        "fma.rn.bf16 %d0, %s0, %s1, %s2",
        &[R::B16],
        &[R::B16; 3],
        &bcases,
    );
    let add = run_op(
        "add.rn.bf16 %d0, %s0, %s1",
        &[R::B16],
        &[R::B16; 2],
        &bcases,
    );
    for (i, c) in bcases.iter().enumerate() {
        let (x, y, z) = (bf(c[0]), bf(c[1]), bf(c[2]));
        assert_eq!(
            fma[i][0] as u16,
            b(x * y + z).to_bits(),
            "fma.bf16 {x} {y} {z}"
        );
        assert_eq!(add[i][0] as u16, b(x + y).to_bits(), "add.bf16 {x} {y}");
    }
}
