//! Integer arithmetic: multiplies (high, wide, mad), shifts, bit fields and counts,
//! division, remainder, saturation, min and max (9.7.1, 9.7.8).

use super::*;

#[test]
fn integer_multiply_high_wide_and_mad() {
    let mut rng = Lcg(29);
    let vals: Vec<u64> = (0..64)
        .map(|_| rng.next() ^ (rng.next() << 48))
        .chain([0, 1, u64::MAX, 1 << 63, 0x8000_0000, 0xffff_ffff])
        .collect();
    let cases: Vec<[u64; 3]> = vals
        .iter()
        .zip(vals.iter().rev())
        .zip(vals.iter().skip(3).chain(&vals[..3]))
        .map(|((&a, &b), &c)| [a, b, c])
        .collect();
    let run32 = |inst: &str, nsrc: usize| -> Vec<u64> {
        let ops = (0..nsrc)
            .map(|i| format!("%s{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        run_op(
            &format!("{inst} %d0, {ops}"),
            &[R::B32],
            &vec![R::B32; nsrc],
            &cases,
        )
        .iter()
        .map(|r| r[0])
        .collect()
    };
    let run64 = |inst: &str, d: R, srcs: &[R]| -> Vec<u64> {
        let ops = (0..srcs.len())
            .map(|i| format!("%s{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        run_op(&format!("{inst} %d0, {ops}"), &[d], srcs, &cases)
            .iter()
            .map(|r| r[0])
            .collect()
    };
    let (u32s, s32s) = (|x: u64| x as u32 as i128, |x: u64| x as u32 as i32 as i128);
    let (u64s, s64s) = (|x: u64| x as i128, |x: u64| x as i64 as i128);
    let hi32 = run32("mul.hi.u32", 2);
    let hi32s = run32("mul.hi.s32", 2);
    let lo32 = run32("mul.lo.s32", 2);
    let mad32 = run32("mad.lo.u32", 3);
    let madhi = run32("mad.hi.s32", 3);
    let wide_u = run64("mul.wide.u32", R::B64, &[R::B32, R::B32]);
    let wide_s = run64("mul.wide.s32", R::B64, &[R::B32, R::B32]);
    let madw = run64("mad.wide.s32", R::B64, &[R::B32, R::B32, R::B64]);
    let hi64 = run64("mul.hi.u64", R::B64, &[R::B64, R::B64]);
    let hi64s = run64("mul.hi.s64", R::B64, &[R::B64, R::B64]);
    let wide16 = run64("mul.wide.s16", R::B32, &[R::B16, R::B16]);
    for (i, &[a, b, c]) in cases.iter().enumerate() {
        let m32 = |x: i128| (x as u64) & 0xffff_ffff;
        assert_eq!(
            hi32[i],
            m32((u32s(a) * u32s(b)) >> 32),
            "mul.hi.u32 {a:x} {b:x}"
        );
        assert_eq!(hi32s[i], m32((s32s(a) * s32s(b)) >> 32), "mul.hi.s32");
        assert_eq!(lo32[i], m32(s32s(a) * s32s(b)), "mul.lo.s32");
        assert_eq!(mad32[i], m32(u32s(a) * u32s(b) + u32s(c)), "mad.lo.u32");
        assert_eq!(
            madhi[i],
            m32(((s32s(a) * s32s(b)) >> 32) + s32s(c)),
            "mad.hi.s32"
        );
        assert_eq!(wide_u[i], (u32s(a) * u32s(b)) as u64, "mul.wide.u32");
        assert_eq!(wide_s[i], (s32s(a) * s32s(b)) as u64, "mul.wide.s32");
        assert_eq!(
            madw[i],
            ((s32s(a) * s32s(b)) as u64).wrapping_add(c),
            "mad.wide.s32"
        );
        assert_eq!(
            hi64[i],
            ((u64s(a) as u128 * u64s(b) as u128) >> 64) as u64,
            "mul.hi.u64"
        );
        assert_eq!(hi64s[i], ((s64s(a) * s64s(b)) >> 64) as u64, "mul.hi.s64");
        assert_eq!(
            wide16[i],
            (a as u16 as i16 as i32 * b as u16 as i16 as i32) as u32 as u64,
            "mul.wide.s16"
        );
    }
}

#[test]
fn integer_shifts_bit_fields_and_bit_counts() {
    // 9.7.8.7-8: shift amounts above the width clamp to it (no masking)
    let sh = |inst: &str, a: u32, b: u32| op32(inst, 2, &[[a, b, 0]])[0];
    assert_eq!(sh("shl.b32", 1, 31), 0x8000_0000);
    assert_eq!(sh("shl.b32", 1, 32), 0);
    assert_eq!(sh("shl.b32", 1, 33), 0, "not 1 << (33 & 31)");
    assert_eq!(sh("shr.u32", 0x8000_0000, 32), 0);
    assert_eq!(sh("shr.s32", 0x8000_0000, 100), 0xffff_ffff);
    assert_eq!(sh("shr.s32", 0x4000_0000, 100), 0);
    assert_eq!(sh("shr.b32", 0x8000_0000, 31), 1);
    let r = run_op(
        "shl.b64 %d0, %s0, %s1",
        &[R::B64],
        &[R::B64, R::B32],
        &[[3, 64, 0], [3, 62, 0]],
    );
    assert_eq!((r[0][0], r[1][0]), (0, 0xc000_0000_0000_0000));
    let r = run_op(
        "shr.s64 %d0, %s0, %s1",
        &[R::B64],
        &[R::B64, R::B32],
        &[[1 << 63, 200, 0]],
    );
    assert_eq!(r[0][0], u64::MAX);
    // bfe (9.7.1.16): pos and len from the low 8 bits; signed fields sign-extend
    let bfe = |inst: &str, a: u32, pos: u32, len: u32| op32(inst, 3, &[[a, pos, len]])[0];
    assert_eq!(bfe("bfe.u32", 0xdead_beef, 8, 12), 0xdbe);
    assert_eq!(bfe("bfe.s32", 0xdead_beef, 8, 12), 0xffff_fdbe);
    assert_eq!(bfe("bfe.s32", 0x0000_7000, 12, 3), 0xffff_ffff);
    assert_eq!(
        bfe("bfe.u32", 0xffff_ffff, 28, 8),
        0xf,
        "fields past bit 31 read no bits"
    );
    assert_eq!(
        bfe("bfe.s32", 0x8000_0000, 40, 4),
        0xffff_ffff,
        "pos past the msb gives the sign"
    );
    assert_eq!(bfe("bfe.u32", 0xffff_ffff, 4, 0), 0);
    assert_eq!(
        bfe("bfe.u32", 0xffff_ffff, 0x104, 0x208),
        0xff,
        "only the low 8 bits of b and c"
    );
    // bfi f, a, b, pos, len: insert the low len bits of a into b at pos
    let r = run_op(
        "bfi.b32 %d0, %s0, %s1, 8, 12",
        &[R::B32],
        &[R::B32, R::B32],
        &[[0x0000_0abc, 0xffff_ffff, 0]],
    );
    assert_eq!(r[0][0], 0xfffa_bcff);
    let r = run_op(
        "bfi.b32 %d0, %s0, %s1, 28, 8",
        &[R::B32],
        &[R::B32, R::B32],
        &[[0xff, 0, 0]],
    );
    assert_eq!(r[0][0], 0xf000_0000);
    // prmt (9.7.9.7): byte selectors; msb of a selector replicates the byte's sign
    let prmt = |a: u32, b: u32, c: u32| op32("prmt.b32", 3, &[[a, b, c]])[0];
    assert_eq!(prmt(0x4433_2211, 0x8877_6655, 0x1074), 0x2211_8855);
    assert_eq!(prmt(0x0000_8070, 0, 0x8901), 0x00ff_7080);
    // lop3 (9.7.8.6): the truth table over (a, b, c) = (0xF0, 0xCC, 0xAA)
    let (a, b, c) = (0x1234_5678u32, 0x0f0f_f0f0u32, 0xff00_ff00u32);
    for lut in [0x96u32, 0xe8, 0x80, 0xfe, 0x1e, 0x00] {
        let r = run_op(
            &format!("lop3.b32 %d0, %s0, %s1, %s2, {lut}"),
            &[R::B32],
            &[R::B32; 3],
            &[[a as u64, b as u64, c as u64]],
        )[0][0] as u32;
        let want = (0..32)
            .map(|k| {
                ((lut >> (((a >> k) & 1) << 2 | ((b >> k) & 1) << 1 | ((c >> k) & 1))) & 1) << k
            })
            .sum::<u32>();
        assert_eq!(r, want, "lop3 {lut:#x}");
    }
    // shf (9.7.8.9): funnel shift of {b:a}
    let shf = |inst: &str, a: u32, b: u32, n: u32| op32(inst, 3, &[[a, b, n]])[0];
    assert_eq!(
        shf("shf.l.wrap.b32", 0x8000_0001, 0x0000_0002, 4),
        0x0000_0028
    );
    assert_eq!(
        shf("shf.l.wrap.b32", 0x8000_0001, 0x0000_0002, 36),
        0x0000_0028
    );
    assert_eq!(
        shf("shf.l.clamp.b32", 0x8000_0001, 0x0000_0002, 36),
        0x8000_0001
    );
    assert_eq!(
        shf("shf.r.wrap.b32", 0x8000_0001, 0x0000_0003, 4),
        0x3800_0000
    );
    assert_eq!(
        shf("shf.r.clamp.b32", 0x8000_0001, 0x0000_0003, 40),
        0x0000_0003
    );
    // counts
    let un = |inst: &str, a: u32| op32(inst, 1, &[[a, 0, 0]])[0];
    assert_eq!(
        (
            un("clz.b32", 0),
            un("clz.b32", 1),
            un("clz.b32", 0x8000_0000)
        ),
        (32, 31, 0)
    );
    assert_eq!(
        (un("popc.b32", 0xf0f0_0001), un("popc.b32", u32::MAX)),
        (9, 32)
    );
    assert_eq!(un("brev.b32", 0x0000_0001), 0x8000_0000);
    assert_eq!(un("brev.b32", 0x1234_5678), 0x1e6a_2c48);
    assert_eq!(
        (un("bfind.u32", 0), un("bfind.u32", 0x0001_0000)),
        (u32::MAX, 16)
    );
    assert_eq!(
        (un("bfind.s32", 0xffff_fff0), un("bfind.s32", u32::MAX)),
        (3, u32::MAX)
    );
    assert_eq!(un("bfind.shiftamt.u32", 0x0001_0000), 15);
    let r = run_op("clz.b64 %d0, %s0", &[R::B32], &[R::B64], &[[1 << 40, 0, 0]]);
    assert_eq!(r[0][0], 23);
    let r = run_op(
        "popc.b64 %d0, %s0",
        &[R::B32],
        &[R::B64],
        &[[u64::MAX, 0, 0]],
    );
    assert_eq!(r[0][0], 64);
}

#[test]
fn integer_division_remainder_saturation_and_min_max() {
    let c = |inst: &str, a: u32, b: u32| op32(inst, 2, &[[a, b, 0]])[0];
    let neg = |x: i32| x as u32;
    assert_eq!(c("div.s32", neg(-7), 2), neg(-3), "truncates toward zero");
    assert_eq!(
        c("rem.s32", neg(-7), 3),
        neg(-1),
        "the remainder takes the dividend's sign"
    );
    assert_eq!(c("rem.s32", 7, neg(-3)), 1);
    assert_eq!(c("div.u32", 7, 2), 3);
    // division by zero is unspecified (9.7.1.8); NVIDIA GPUs give all bits set
    assert_eq!(
        (
            c("div.u32", 7, 0),
            c("div.s32", neg(-7), 0),
            c("rem.u32", 7, 0)
        ),
        (u32::MAX, u32::MAX, u32::MAX)
    );
    // INT_MIN / -1 wraps and does not trap
    assert_eq!(
        (
            c("div.s32", 0x8000_0000, neg(-1)),
            c("rem.s32", 0x8000_0000, neg(-1))
        ),
        (0x8000_0000, 0)
    );
    assert_eq!(c("add.sat.s32", 0x7fff_ffff, 1), 0x7fff_ffff);
    assert_eq!(c("sub.sat.s32", 0x8000_0000, 1), 0x8000_0000);
    assert_eq!(
        c("add.s32", 0x7fff_ffff, 1),
        0x8000_0000,
        "wraps without .sat"
    );
    assert_eq!(
        (c("min.s32", neg(-1), 1), c("min.u32", neg(-1), 1)),
        (neg(-1), 1)
    );
    assert_eq!(
        (c("max.s32", neg(-1), 1), c("max.u32", neg(-1), 1)),
        (1, neg(-1))
    );
    let un = |inst: &str, a: u32| op32(inst, 1, &[[a, 0, 0]])[0];
    assert_eq!(
        (un("abs.s32", 0x8000_0000), un("neg.s32", 0x8000_0000)),
        (0x8000_0000, 0x8000_0000)
    );
    assert_eq!(
        (
            un("not.b32", 0x0f0f_0f0f),
            un("cnot.b32", 0),
            un("cnot.b32", 5)
        ),
        (0xf0f0_f0f0, 1, 0)
    );
    let r = run_op(
        "sad.u32 %d0, %s0, %s1, %s2",
        &[R::B32],
        &[R::B32; 3],
        &[[3, 10, 100]],
    );
    assert_eq!(r[0][0], 107);
    let r = run_op(
        "mul24.lo.u32 %d0, %s0, %s1",
        &[R::B32],
        &[R::B32; 2],
        &[[0xff00_0003, 0x0100_0005, 0]],
    );
    assert_eq!(r[0][0], 15, "mul24 uses the low 24 bits");
    let r = run_op(
        "add.s16 %d0, %s0, %s1",
        &[R::B16],
        &[R::B16; 2],
        &[[0x7fff, 1, 0]],
    );
    assert_eq!(r[0][0], 0x8000);
    let r = run_op(
        "div.s64 %d0, %s0, %s1",
        &[R::B64],
        &[R::B64; 2],
        &[[(-9i64) as u64, 2, 0]],
    );
    assert_eq!(r[0][0], (-4i64) as u64);
}
