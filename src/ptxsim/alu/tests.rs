use super::*;

#[test]
fn integer_edge_cases_follow_the_manual() {
    assert_eq!(int(IntOp::Shl, Ty::B32, 1, 32, 0, false), 0);
    assert_eq!(
        int(IntOp::Shr, Ty::S32, 0x8000_0000, 40, 0, false),
        0xffff_ffff
    );
    assert_eq!(int(IntOp::Shr, Ty::U32, 0x8000_0000, 31, 0, false), 1);
    assert_eq!(
        int(IntOp::MulWide, Ty::S32, 0xffff_ffff, 3, 0, false),
        (-3i64) as u64
    );
    assert_eq!(
        int(IntOp::MulHi, Ty::U32, 0xffff_ffff, 0xffff_ffff, 0, false),
        0xffff_fffe
    );
    assert_eq!(int(IntOp::Div, Ty::U32, 7, 0, 0, false), 0xffff_ffff);
    assert_eq!(
        int(IntOp::Add, Ty::S32, 0x7fff_ffff, 1, 0, true),
        0x7fff_ffff
    );
    assert_eq!(
        int(IntOp::MadWide, Ty::U32, 0xffff_ffff, 2, 5, false),
        0x2_0000_0003
    );
    assert_eq!(int_un(IntUn::Clz, Ty::B32, 1), 31);
    assert_eq!(int_un(IntUn::Bfind, Ty::S32, 0xffff_fff0), 3);
    assert_eq!(int_un(IntUn::Brev, Ty::B32, 1), 0x8000_0000);
    assert_eq!(bfe(Ty::S32, 0xf0, 4, 4), 0xffff_ffff);
    assert_eq!(bfe(Ty::U32, 0xf0, 4, 4), 0xf);
    assert_eq!(bfi(Ty::B32, 0b101, 0, 8, 3), 0b101 << 8);
    assert_eq!(prmt(0x4433_2211, 0x8877_6655, 0x3210), 0x4433_2211);
    assert_eq!(prmt(0x4433_2211, 0x8877_6655, 0x7654), 0x8877_6655);
    // byte 0: sign of byte 0 (selector 8); bytes 1-3: byte 0 itself (selector 0)
    assert_eq!(prmt(0x0000_0080, 0, 0x0008), 0x8080_80ff);
    assert_eq!(lop3(0xF0, 0xCC, 0xAA, 0x80), 0xF0 & 0xCC & 0xAA);
    assert_eq!(shf(true, true, 0x8000_0000, 1, 1), 3);
    assert_eq!(shf(false, false, 1, 2, 32), 2);
}

#[test]
fn conversions_saturate_and_round() {
    let f = |x: f32| x.to_bits() as u64;
    assert_eq!(
        cvt(
            Ty::S32,
            Ty::F32,
            Some(Rnd::Zero),
            true,
            false,
            false,
            false,
            false,
            f(-3.7),
            32
        ),
        (-3i32) as u32 as u64
    );
    assert_eq!(
        cvt(
            Ty::S32,
            Ty::F32,
            Some(Rnd::Near),
            true,
            false,
            false,
            false,
            false,
            f(2.5),
            32
        ),
        2
    );
    assert_eq!(
        cvt(
            Ty::U32,
            Ty::F32,
            Some(Rnd::Zero),
            true,
            false,
            false,
            false,
            false,
            f(-1.0),
            32
        ),
        0
    );
    assert_eq!(
        cvt(
            Ty::S32,
            Ty::F32,
            Some(Rnd::Zero),
            true,
            false,
            false,
            false,
            false,
            f(1e20),
            32
        ),
        0x7fff_ffff
    );
    assert_eq!(
        cvt(
            Ty::S32,
            Ty::F32,
            Some(Rnd::Zero),
            true,
            false,
            false,
            false,
            false,
            f(f32::NAN),
            32
        ),
        0
    );
    assert_eq!(
        cvt(
            Ty::S64,
            Ty::S32,
            None,
            false,
            false,
            false,
            false,
            false,
            0xffff_ffff,
            64
        ),
        u64::MAX
    );
    assert_eq!(
        cvt(
            Ty::F32,
            Ty::S32,
            Some(Rnd::Near),
            false,
            false,
            false,
            false,
            false,
            7,
            32
        ),
        f(7.0)
    );
    // 2^24 + 1 is not an f32: nearest-even gives 2^24, up gives 2^24 + 2
    let big = (1u64 << 24) + 1;
    assert_eq!(
        cvt(
            Ty::F32,
            Ty::U32,
            Some(Rnd::Near),
            false,
            false,
            false,
            false,
            false,
            big,
            32
        ),
        f(16777216.0)
    );
    assert_eq!(
        cvt(
            Ty::F32,
            Ty::U32,
            Some(Rnd::Up),
            false,
            false,
            false,
            false,
            false,
            big,
            32
        ),
        f(16777218.0)
    );
    let bf = cvt(
        Ty::Bf16,
        Ty::F32,
        Some(Rnd::Near),
        false,
        false,
        false,
        false,
        false,
        f(1.0 / 3.0),
        16,
    );
    assert_eq!(bf as u16, half::bf16::from_f32(1.0 / 3.0).to_bits());
    assert_eq!(
        cvt(
            Ty::F32,
            Ty::Bf16,
            None,
            false,
            false,
            false,
            false,
            false,
            bf,
            32
        ),
        f(half::bf16::from_bits(bf as u16).to_f32())
    );
    // tf32 keeps 10 fraction bits, ties away
    let t = cvt(
        Ty::Tf32,
        Ty::F32,
        Some(Rnd::NearAway),
        false,
        false,
        false,
        false,
        false,
        f(1.0 + 2f32.powi(-11)),
        32,
    );
    assert_eq!(t, f(1.0 + 2f32.powi(-10)));
}

#[test]
fn float_compare_and_approx_specials() {
    let f = |x: f32| x.to_bits() as u64;
    assert!(!compare(Cmp::Ne, Ty::F32, false, f(f32::NAN), f(1.0)));
    assert!(compare(Cmp::Neu, Ty::F32, false, f(f32::NAN), f(1.0)));
    assert!(compare(Cmp::Lt, Ty::S32, false, 0xffff_ffff, 0));
    assert!(!compare(Cmp::Lo, Ty::U32, false, 0xffff_ffff, 0));
    assert_eq!(
        float_un(
            FloatUn::Ex2,
            Ty::F32,
            Rnd::Near,
            true,
            true,
            f(f32::NEG_INFINITY)
        ),
        f(0.0)
    );
    assert_eq!(
        float_un(FloatUn::Lg2, Ty::F32, Rnd::Near, true, true, f(0.0)),
        f(f32::NEG_INFINITY)
    );
    assert_eq!(
        float_un(FloatUn::Rcp, Ty::F32, Rnd::Near, true, false, f(-0.0)),
        f(f32::NEG_INFINITY)
    );
    // div.approx: |b| in (2^126, 2^128) gives zero
    assert_eq!(
        float32(
            FloatOp::DivApprox,
            Rnd::Near,
            false,
            false,
            f(1.0),
            f(2f32.powi(127)),
            0
        ),
        f(0.0)
    );
    assert_eq!(
        float32(
            FloatOp::Copysign,
            Rnd::Near,
            false,
            false,
            f(-1.0),
            f(2.0),
            0
        ),
        f(-2.0)
    );
}
