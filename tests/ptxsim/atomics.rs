//! 5. Atomics (9.7.13.5 atom, 9.7.13.6 red)

use super::*;

/// Slots of the global atomics test (u32 words).
mod slot {
    pub const ADD: usize = 0;
    pub const FADD: usize = 1;
    pub const ADD64: usize = 2; // and 3
    pub const CAS: usize = 4;
    pub const INC: usize = 5;
    pub const DEC: usize = 6;
    pub const MIN: usize = 7;
    pub const MAX: usize = 8;
    pub const EXCH: usize = 9;
    pub const OR: usize = 10;
    pub const XOR: usize = 11;
    pub const AND: usize = 12;
    pub const UMAX: usize = 13;
    pub const WORDS: usize = 14;
}

const ATOMICS: &str = r#"
.visible .entry atoms(.param .u64 g, .param .u64 olds)
{
    .reg .pred %p<4>;
    .reg .b32 %r<24>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<16>;
    mov.u32 %r0, %tid.x;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mad.lo.u32 %r3, %r1, %r2, %r0;
    ld.param.u64 %rd1, [g];
    ld.param.u64 %rd2, [olds];
    mul.wide.u32 %rd3, %r3, 16;
    add.u64 %rd4, %rd2, %rd3;
    // exact integer and float totals
    atom.global.add.u32 %r4, [%rd1], 1;
    red.global.add.f32 [%rd1+4], 0f3F800000;
    mov.u64 %rd5, 0x100000001;
    atom.global.add.u64 %rd6, [%rd1+8], %rd5;
    // a lock-free increment with compare-and-swap
    mov.u32 %r5, 0;
$CAS:
    add.u32 %r6, %r5, 1;
    atom.global.cas.b32 %r7, [%rd1+16], %r5, %r6;
    setp.ne.u32 %p1, %r7, %r5;
    mov.u32 %r5, %r7;
    @%p1 bra $CAS;
    // wrapping increment and decrement in [0, 9]
    atom.global.inc.u32 %r8, [%rd1+20], 9;
    red.global.dec.u32 [%rd1+24], 9;
    // min and max of a scrambled signed value
    mul.lo.u32 %r9, %r3, 7919;
    rem.u32 %r9, %r9, 10007;
    sub.s32 %r9, %r9, 5000;
    atom.global.min.s32 %r10, [%rd1+28], %r9;
    red.global.max.s32 [%rd1+32], %r9;
    red.global.max.u32 [%rd1+52], %r9;
    // exchange: the old values form a chain through every thread's value
    add.u32 %r11, %r3, 1;
    atom.global.exch.b32 %r12, [%rd1+36], %r11;
    // bit operations on bit (thread % 32)
    and.b32 %r13, %r3, 31;
    mov.u32 %r14, 1;
    shl.b32 %r15, %r14, %r13;
    red.global.or.b32 [%rd1+40], %r15;
    red.global.xor.b32 [%rd1+44], %r15;
    not.b32 %r16, %r15;
    atom.global.and.b32 %r17, [%rd1+48], %r16;
    st.global.v4.u32 [%rd4], {%r4, %r8, %r12, %r10};
    ret;
}
"#;

#[test]
fn global_atomics_from_many_blocks_are_exact() {
    let (blocks, threads) = (64u32, 128u32);
    let n = (blocks * threads) as usize;
    let d = dev();
    let mut init = [0u32; slot::WORDS];
    init[slot::MIN] = i32::MAX as u32;
    init[slot::MAX] = i32::MIN as u32;
    init[slot::AND] = u32::MAX;
    let g = up(&d, &init);
    let olds = zeros::<u32>(&d, 4 * n);
    ok(
        &d,
        &sm80(ATOMICS),
        "atoms",
        cfg(blocks, threads),
        &[p(g), p(olds)],
    );
    let v: Vec<u32> = down(&d, g, slot::WORDS);
    let o: Vec<u32> = down(&d, olds, 4 * n);
    let n32 = n as u32;
    assert_eq!(v[slot::ADD], n32);
    assert_eq!(f32::from_bits(v[slot::FADD]), n as f32);
    assert_eq!(
        v[slot::ADD64] as u64 | (v[slot::ADD64 + 1] as u64) << 32,
        n as u64 * 0x1_0000_0001
    );
    assert_eq!(v[slot::CAS], n32);
    // inc(r, 9) = r >= 9 ? 0 : r + 1; dec(r, 9) = r == 0 || r > 9 ? 9 : r - 1
    assert_eq!(v[slot::INC], n32 % 10);
    assert_eq!(v[slot::DEC], (10 - n32 % 10) % 10);
    let scrambled: Vec<i32> = (0..n as u32)
        .map(|i| ((i * 7919) % 10007) as i32 - 5000)
        .collect();
    assert_eq!(v[slot::MIN] as i32, *scrambled.iter().min().unwrap());
    assert_eq!(v[slot::MAX] as i32, *scrambled.iter().max().unwrap());
    assert_eq!(
        v[slot::UMAX],
        scrambled.iter().map(|&x| x as u32).max().unwrap(),
        "max.u32 compares unsigned"
    );
    assert_eq!((v[slot::OR], v[slot::XOR], v[slot::AND]), (u32::MAX, 0, 0));
    // every atom returned a distinct old value: add's are 0..n, exch's with the final value
    // are 0..=n, inc's lie in [0, 9] with each value n/10 times (rounded)
    let mut adds: Vec<u32> = (0..n).map(|i| o[4 * i]).collect();
    adds.sort_unstable();
    assert_eq!(adds, (0..n32).collect::<Vec<_>>());
    let mut chain: Vec<u32> = (0..n)
        .map(|i| o[4 * i + 2])
        .chain([v[slot::EXCH]])
        .collect();
    chain.sort_unstable();
    assert_eq!(chain, (0..=n32).collect::<Vec<_>>());
    let mut hist = [0usize; 10];
    for i in 0..n {
        hist[o[4 * i + 1] as usize] += 1;
    }
    assert!(
        hist.iter().all(|&h| h == n / 10 || h == n / 10 + 1),
        "{hist:?}"
    );
    // atom.min returns the value before it
    assert!((0..n).all(|i| o[4 * i + 3] as i32 >= *scrambled.iter().min().unwrap()));
}

const SHARED_ATOMICS: &str = r#"
.visible .entry satoms(.param .u64 out, .param .u32 init)
{
    .shared .align 4 .b32 s[4];
    .reg .pred %p<4>;
    .reg .b32 %r<16>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [init];
    setp.eq.u32 %p1, %r0, 0;
    setp.ne.u32 %p2, %r1, 0;
    and.pred %p3, %p1, %p2;
    mov.u32 %r2, 0;
    mov.u32 %r3, -1000;
    @%p3 st.shared.v4.u32 [s], {%r2, %r2, %r3, %r2};
    bar.sync 0;
    atom.shared.add.u32 %r4, [s], 3; // FIRST
    atom.shared.add.f32 %f1, [s+4], 0f3F000000;
    // (tid - 100), negated for every third thread
    sub.s32 %r5, %r0, 100;
    rem.u32 %r6, %r0, 3;
    setp.eq.u32 %p1, %r6, 0;
    neg.s32 %r7, %r5;
    selp.b32 %r5, %r7, %r5, %p1;
    atom.shared.max.s32 %r8, [s+8], %r5;
    mov.u32 %r9, 0;
$CAS:
    add.u32 %r10, %r9, 2;
    atom.shared.cas.b32 %r11, [s+12], %r9, %r10;
    setp.ne.u32 %p1, %r11, %r9;
    mov.u32 %r9, %r11;
    @%p1 bra $CAS;
    bar.sync 0;
    setp.eq.u32 %p1, %r0, 0;
    @!%p1 bra $END;
    ld.shared.v4.u32 {%r12, %r13, %r14, %r15}, [s];
    mov.u32 %r1, %ctaid.x;
    mul.wide.u32 %rd2, %r1, 16;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r12, %r13, %r14, %r15};
$END:
    ret;
}
"#;

#[test]
fn shared_atomics_are_exact_per_block_and_need_initialised_memory() {
    let d = dev();
    let ptx = sm80(SHARED_ATOMICS);
    let out = zeros::<u32>(&d, 16);
    ok(&d, &ptx, "satoms", cfg(4, 256), &[p(out), Arg::I32(1)]);
    let o: Vec<u32> = down(&d, out, 16);
    let max = (0..256i32)
        .map(|t| if t % 3 == 0 { 100 - t } else { t - 100 })
        .max()
        .unwrap();
    for b in 0..4 {
        let r = &o[4 * b..4 * b + 4];
        assert_eq!(r[0], 3 * 256, "add.u32 block {b}");
        assert_eq!(f32::from_bits(r[1]), 128.0, "add.f32");
        assert_eq!(r[2] as i32, max, "max.s32");
        assert_eq!(r[3], 2 * 256, "cas loop");
    }
    // without the initialising store, the first atomic reads never-written shared memory
    let f = fault(launch(
        &d,
        &ptx,
        "satoms",
        cfg(1, 32),
        &[p(out), Arg::I32(0)],
    ));
    assert_eq!(
        (f.check, f.line),
        (Check::Initcheck, line_of(&ptx, "// FIRST")),
        "{f}"
    );
}

#[test]
fn float_atomics_other_than_add_are_refused_at_load() {
    // 9.7.13.5: min/max/inc/dec are integer operations; the float operation is .add
    let d = dev();
    let ptx = sm80(
        ".visible .entry k(.param .u64 g)\n{\n.reg .f32 %f<2>;\n.reg .b64 %rd<2>;\nld.param.u64 %rd1, [g];\natom.global.min.f32 %f1, [%rd1], %f0;\nret;\n}\n",
    );
    match d.load_module("m", &ptx) {
        Err(SimError::Ptx(line, m)) => assert!(line == 9 && m.contains("only .add"), "{line}: {m}"),
        other => panic!("expected a PTX error, got {:?}", other.map(|_| ())),
    }
}
