//! cvt between floats and integers and to the narrow float formats (9.7.9.21).

use super::*;

#[test]
fn cvt_float_to_int_saturates_and_rounds_as_asked() {
    // 9.7.9.21: float -> int clamps to the destination range; NaN gives 0 (for a non-f64
    // source and a destination narrower than 64 bits), else 1 << (bits - 1)
    let nan = f(f32::NAN);
    let c = |inst: &str, x: u32| op32(inst, 1, &[[x, 0, 0]])[0];
    assert_eq!(c("cvt.rzi.s32.f32", f(1e20)), i32::MAX as u32);
    assert_eq!(c("cvt.rzi.s32.f32", f(-1e20)), i32::MIN as u32);
    assert_eq!(c("cvt.rzi.s32.f32", f(f32::INFINITY)), i32::MAX as u32);
    assert_eq!(c("cvt.rzi.s32.f32", nan), 0);
    assert_eq!(c("cvt.rzi.u32.f32", f(-5.0)), 0);
    assert_eq!(c("cvt.rzi.u32.f32", f(5e9)), u32::MAX);
    assert_eq!(c("cvt.rni.s32.f32", f(2.5)), 2);
    assert_eq!(c("cvt.rni.s32.f32", f(3.5)), 4);
    assert_eq!(c("cvt.rni.s32.f32", f(-2.5)), -2i32 as u32);
    assert_eq!(c("cvt.rmi.s32.f32", f(-2.5)), -3i32 as u32);
    assert_eq!(c("cvt.rpi.s32.f32", f(2.1)), 3);
    assert_eq!(c("cvt.rzi.s32.f32", f(-2.9)), -2i32 as u32);
    // narrow destinations clamp to their own range
    let r = run_op(
        "cvt.rzi.u8.f32 %d0, %s0",
        &[R::B16],
        &[R::B32],
        &[[f(300.0) as u64, 0, 0], [f(-3.0) as u64, 0, 0]],
    );
    assert_eq!((r[0][0], r[1][0]), (255, 0));
    let r = run_op(
        "cvt.rzi.s16.f32 %d0, %s0",
        &[R::B16],
        &[R::B32],
        &[[f(-40000.0) as u64, 0, 0]],
    );
    assert_eq!(r[0][0], 0x8000);
    // 64-bit destinations and f64 sources give the top bit for NaN
    let r = run_op(
        "cvt.rzi.s64.f32 %d0, %s0",
        &[R::B64],
        &[R::B32],
        &[[nan as u64, 0, 0]],
    );
    assert_eq!(r[0][0], 1 << 63);
    let r = run_op(
        "cvt.rzi.s32.f64 %d0, %s0",
        &[R::B32],
        &[R::B64],
        &[[f64::NAN.to_bits(), 0, 0]],
    );
    assert_eq!(r[0][0], 0x8000_0000);
    let r = run_op(
        "cvt.rzi.u64.f64 %d0, %s0",
        &[R::B64],
        &[R::B64],
        &[[1e30f64.to_bits(), 0, 0]],
    );
    assert_eq!(r[0][0], u64::MAX);
    // rounding to an integral value in float format
    assert_eq!(c("cvt.rni.f32.f32", f(2.5)), f(2.0));
    assert_eq!(c("cvt.rmi.f32.f32", f(-0.5)), f(-1.0));
    assert_eq!(c("cvt.rzi.f32.f32", f(-0.5)), f(-0.0));
}

#[test]
fn cvt_int_to_float_rounds_as_asked() {
    let c = |inst: &str, x: u32| fx(op32(inst, 1, &[[x, 0, 0]])[0]);
    let big = (1u32 << 24) + 1; // between 2^24 and 2^24 + 2
    assert_eq!(c("cvt.rn.f32.u32", big), 16777216.0);
    assert_eq!(c("cvt.rz.f32.u32", big), 16777216.0);
    assert_eq!(c("cvt.rm.f32.u32", big), 16777216.0);
    assert_eq!(c("cvt.rp.f32.u32", big), 16777218.0);
    assert_eq!(c("cvt.rn.f32.u32", big + 2), 16777220.0, "tie to even");
    assert_eq!(c("cvt.rn.f32.s32", -(big as i32) as u32), -16777216.0);
    assert_eq!(c("cvt.rm.f32.s32", -(big as i32) as u32), -16777218.0);
    assert_eq!(c("cvt.rz.f32.s32", -(big as i32) as u32), -16777216.0);
    assert_eq!(c("cvt.rn.f32.s32", 0x8000_0000), -2147483648.0);
    let r = run_op(
        "cvt.rn.f32.u64 %d0, %s0",
        &[R::B32],
        &[R::B64],
        &[[u64::MAX, 0, 0]],
    );
    assert_eq!(fx(r[0][0] as u32), 2f32.powi(64));
    let r = run_op(
        "cvt.rz.f32.u64 %d0, %s0",
        &[R::B32],
        &[R::B64],
        &[[u64::MAX, 0, 0]],
    );
    assert_eq!(fx(r[0][0] as u32), 2f32.powi(64) - 2f32.powi(40));
    let r = run_op(
        "cvt.rn.f64.s64 %d0, %s0",
        &[R::B64],
        &[R::B64],
        &[[(1u64 << 53) + 1, 0, 0]],
    );
    assert_eq!(f64::from_bits(r[0][0]), 2f64.powi(53));
    let r = run_op(
        "cvt.rp.f64.s64 %d0, %s0",
        &[R::B64],
        &[R::B64],
        &[[(1u64 << 53) + 1, 0, 0]],
    );
    assert_eq!(f64::from_bits(r[0][0]), 2f64.powi(53) + 2.0);
    // int -> int: .sat clamps, otherwise truncate / extend by the source type
    let r = run_op(
        "cvt.sat.s8.s32 %d0, %s0",
        &[R::B32],
        &[R::B32],
        &[[300, 0, 0], [(-300i32) as u32 as u64, 0, 0]],
    );
    assert_eq!(
        (r[0][0], r[1][0]),
        (127, 0xffff_ff80),
        "s8 results sign-extend into a 32-bit register"
    );
    let r = run_op(
        "cvt.u16.u32 %d0, %s0",
        &[R::B16],
        &[R::B32],
        &[[0x12345, 0, 0]],
    );
    assert_eq!(r[0][0], 0x2345);
    let r = run_op(
        "cvt.s64.s16 %d0, %s0",
        &[R::B64],
        &[R::B16],
        &[[0x8001, 0, 0]],
    );
    assert_eq!(r[0][0], (-32767i64) as u64);
}

#[test]
fn cvt_to_bf16_f16_tf32_round_and_pack() {
    let h16 = |inst: &str, x: f32| {
        run_op(
            &format!("{inst} %d0, %s0"),
            &[R::B16],
            &[R::B32],
            &[[f(x) as u64, 0, 0]],
        )[0][0] as u16
    };
    let bf = |x: f32| half::bf16::from_f32(x).to_bits();
    let hf = |x: f32| half::f16::from_f32(x).to_bits();
    // bf16: 1 + 2^-8 is half an ulp above 1 (ties to even: 1); 1 + 3 2^-8 ties up to 1 + 2^-6
    assert_eq!(h16("cvt.rn.bf16.f32", 1.0 + 2f32.powi(-8)), bf(1.0));
    assert_eq!(
        h16("cvt.rn.bf16.f32", 1.0 + 3.0 * 2f32.powi(-8)),
        bf(1.0 + 2f32.powi(-6))
    );
    assert_eq!(h16("cvt.rz.bf16.f32", 1.99), bf(1.984375));
    assert_eq!(
        h16("cvt.rp.bf16.f32", 1.0 + 2f32.powi(-20)),
        bf(1.0 + 2f32.powi(-7))
    );
    assert_eq!(
        h16("cvt.rm.bf16.f32", -1.0 - 2f32.powi(-20)),
        bf(-1.0 - 2f32.powi(-7))
    );
    let mut rng = Lcg(3);
    for _ in 0..64 {
        let x = random_f32(&mut rng, -100, 100);
        assert_eq!(h16("cvt.rn.bf16.f32", x), bf(x), "bf16 of {x:e}");
        let y = random_f32(&mut rng, -20, 15);
        assert_eq!(h16("cvt.rn.f16.f32", y), hf(y), "f16 of {y:e}");
    }
    assert!(half::bf16::from_bits(h16("cvt.rn.bf16.f32", f32::NAN)).is_nan());
    // f16: overflow, saturation to the largest finite value, relu, subnormals
    assert_eq!(h16("cvt.rn.f16.f32", 70000.0), 0x7c00);
    assert_eq!(h16("cvt.rz.f16.f32", 70000.0), 0x7bff);
    assert_eq!(h16("cvt.rn.satfinite.f16.f32", -70000.0), 0xfbff);
    assert_eq!(h16("cvt.rn.relu.f16.f32", -3.0), 0);
    assert_eq!(h16("cvt.rn.f16.f32", 2f32.powi(-20)), 0x0010);
    assert_eq!(
        h16("cvt.rn.f16.f32", 2f32.powi(-25)),
        0,
        "a tie between 0 and the least subnormal"
    );
    assert_eq!(h16("cvt.rp.f16.f32", 2f32.powi(-25)), 1);
    // back to f32 exactly
    let r = run_op(
        "cvt.f32.f16 %d0, %s0",
        &[R::B32],
        &[R::B16],
        &[[0x3555, 0, 0]],
    );
    assert_eq!(fx(r[0][0] as u32), half::f16::from_bits(0x3555).to_f32());
    // tf32: 10 fraction bits, ties away from zero, the low 13 bits clear (9.7.9.21, 5.2.3)
    let t = |x: f32| fx(op32("cvt.rna.tf32.f32", 1, &[[f(x), 0, 0]])[0]);
    assert_eq!(t(1.0 + 2f32.powi(-11)), 1.0 + 2f32.powi(-10));
    assert_eq!(t(-1.0 - 2f32.powi(-11)), -1.0 - 2f32.powi(-10));
    assert_eq!(t(1.0 + 2f32.powi(-12)), 1.0);
    for _ in 0..64 {
        let x = random_f32(&mut rng, -30, 30);
        let r = t(x);
        assert_eq!(r.to_bits() & 0x1fff, 0, "tf32 of {x:e}");
        assert!(
            (r as f64 - x as f64).abs() <= (x.abs() as f64) * 2f64.powi(-11),
            "tf32 of {x:e}: {r:e}"
        );
    }
    // packed: the first source goes to the upper half
    let r = op32("cvt.rn.bf16x2.f32", 2, &[[f(1.0), f(-2.0), 0]]);
    assert_eq!(r[0], (bf(1.0) as u32) << 16 | bf(-2.0) as u32);
    let r = op32("cvt.rn.f16x2.f32", 2, &[[f(0.5), f(3.0), 0]]);
    assert_eq!(r[0], (hf(0.5) as u32) << 16 | hf(3.0) as u32);
}
