//! 4. Memory and the checks (memcheck, racecheck, initcheck); state spaces

use super::*;

const COPY: &str = r#"
.visible .entry copy(.param .u64 in, .param .u64 out)
{
    .reg .b32 %r<8>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %tid.x;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mad.lo.u32 %r3, %r1, %r2, %r0;
    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [out];
    mul.wide.u32 %rd3, %r3, 4;
    add.u64 %rd4, %rd1, %rd3;
    ld.global.f32 %f1, [%rd4]; // READ
    add.u64 %rd5, %rd2, %rd3;
    st.global.f32 [%rd5], %f1; // WRITE
    ret;
}
"#;

#[test]
fn memcheck_reports_a_read_one_element_past_the_end() {
    let d = dev();
    let ptx = sm80(COPY);
    let input = up(&d, &[1.0f32; 100]);
    let out = zeros::<f32>(&d, 128);
    let f = fault(launch(&d, &ptx, "copy", cfg(2, 64), &[p(input), p(out)]));
    assert_eq!(f.check, Check::Memcheck, "{f}");
    assert_eq!(
        (f.kernel.as_str(), f.block, f.thread),
        ("copy", [1, 0, 0], [36, 0, 0]),
        "{f}"
    );
    assert_eq!(f.line, line_of(&ptx, "// READ"));
    assert!(f.text.starts_with("ld.global.f32"), "{f}");
    assert!(
        f.detail.contains("0 bytes past the end of allocation"),
        "{f}"
    );
    assert!(
        f.detail.contains(&format!("(400 bytes at {input:#x})")),
        "names the allocation: {f}"
    );
    let shown = f.to_string();
    assert!(
        shown.starts_with(&format!(
            "memcheck: kernel `copy` block (1,0,0) thread (36,0,0) PTX line {}",
            f.line
        )),
        "{shown}"
    );
}

#[test]
fn memcheck_reports_a_write_past_the_end() {
    let d = dev();
    let ptx = sm80(COPY);
    let input = up(&d, &[2.0f32; 128]);
    let out = zeros::<f32>(&d, 100);
    let f = fault(launch(&d, &ptx, "copy", cfg(1, 128), &[p(input), p(out)]));
    assert_eq!(f.check, Check::Memcheck, "{f}");
    assert_eq!(
        (f.thread, f.line),
        ([100, 0, 0], line_of(&ptx, "// WRITE")),
        "{f}"
    );
    assert!(
        f.detail.contains("global write") && f.detail.contains(&format!("(400 bytes at {out:#x})")),
        "{f}"
    );
    // the in-bounds threads' writes happened
    assert_eq!(down::<f32>(&d, out, 100), vec![2.0; 100]);
}

#[test]
fn memcheck_reports_use_after_free_and_wild_pointers() {
    let d = dev();
    let ptx = sm80(COPY);
    let input = up(&d, &[1.0f32; 64]);
    let out = zeros::<f32>(&d, 64);
    d.free(input).unwrap();
    let f = fault(launch(&d, &ptx, "copy", cfg(1, 64), &[p(input), p(out)]));
    assert_eq!(f.check, Check::Memcheck, "{f}");
    assert!(
        f.detail.contains("use after free") && f.detail.contains(&format!("{input:#x}")),
        "{f}"
    );
    // a pointer near the top of the address space (e.g. a null pointer minus an offset)
    let f = fault(launch(
        &d,
        &ptx,
        "copy",
        cfg(1, 64),
        &[p(u64::MAX - 3), p(out)],
    ));
    assert_eq!(f.check, Check::Memcheck, "{f}");
    assert!(f.detail.contains("in no allocation"), "{f}");
    let f = fault(launch(&d, &ptx, "copy", cfg(1, 64), &[p(0), p(out)]));
    assert_eq!(f.check, Check::Memcheck, "{f}");
}

const MISALIGNED: &str = r#"
.visible .entry mis(.param .u64 in, .param .u64 out)
{
    .reg .f32 %f<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [out];
    @LOAD@ // LOAD
    st.global.f32 [%rd2], %f1;
    ret;
}
"#;

#[test]
fn memcheck_reports_misaligned_accesses() {
    // 6.4.1: addresses must be naturally aligned to the access size (vector: whole size)
    let d = dev();
    let input = up(&d, &[1.0f32; 16]);
    let out = zeros::<f32>(&d, 4);
    for (load, size) in [
        ("ld.global.f32 %f1, [%rd1+2];", 4),
        ("ld.global.v2.f32 {%f1, %f2}, [%rd1+4];", 8),
        ("ld.global.v4.f32 {%f1, %f2, %f3, %f0}, [%rd1+8];", 16),
    ] {
        let ptx = sm80(&MISALIGNED.replace("@LOAD@", load));
        let f = fault(launch(&d, &ptx, "mis", cfg(1, 1), &[p(input), p(out)]));
        assert_eq!(
            (f.check, f.line),
            (Check::Memcheck, line_of(&ptx, "// LOAD")),
            "{f}"
        );
        assert!(f.detail.contains(&format!("misaligned {size}-byte")), "{f}");
    }
    let ptx = sm80(&MISALIGNED.replace(
        "@LOAD@",
        "ld.global.v4.f32 {%f1, %f2, %f3, %f0}, [%rd1+16];",
    ));
    ok(&d, &ptx, "mis", cfg(1, 1), &[p(input), p(out)]);
}

const SHARED_OOB: &str = r#"
.visible .entry soob(.param .u32 below)
{
    .shared .align 4 .b32 s[32];
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    mov.u32 %r0, %tid.x;
    ld.param.u32 %r4, [below];
    setp.ne.u32 %p1, %r4, 0;
    mov.u32 %r1, s;
    mad.lo.u32 %r2, %r0, 4, %r1;
    @!%p1 st.shared.u32 [%r2], %r0; // STORE
    @%p1 ld.shared.u32 %r3, [s+-4]; // NEGATIVE
    ret;
}
"#;

#[test]
fn memcheck_reports_shared_memory_out_of_bounds() {
    let d = dev();
    let ptx = sm80(SHARED_OOB);
    let f = fault(launch(&d, &ptx, "soob", cfg(1, 33), &[Arg::I32(0)]));
    assert_eq!(
        (f.check, f.thread, f.line),
        (Check::Memcheck, [32, 0, 0], line_of(&ptx, "// STORE")),
        "{f}"
    );
    assert!(
        f.detail.contains("out-of-bounds shared write") && f.detail.contains("128 bytes"),
        "{f}"
    );
    // below the start of shared memory
    let f = fault(launch(&d, &ptx, "soob", cfg(1, 32), &[Arg::I32(1)]));
    assert_eq!(
        (f.check, f.line),
        (Check::Memcheck, line_of(&ptx, "// NEGATIVE")),
        "{f}"
    );
}

const LOCAL: &str = r#"
.visible .entry loc(.param .u64 out, .param .u32 extra)
{
    .local .align 4 .b8 arr[64];
    .reg .pred %p<2>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<12>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd9, [out];
    ld.param.u32 %r9, [extra];
    mov.u64 %rd0, arr;
    mov.u32 %r1, 0;
$FILL:
    mad.lo.u32 %r2, %r0, 100, %r1;
    mul.wide.u32 %rd1, %r1, 4;
    add.u64 %rd2, %rd0, %rd1;
    st.local.u32 [%rd2], %r2;
    add.u32 %r1, %r1, 1;
    setp.lt.u32 %p1, %r1, 16;
    @%p1 bra $FILL;
    mul.lo.u32 %r3, %r0, 7;
    and.b32 %r3, %r3, 15;
    add.u32 %r3, %r3, %r9;
    mul.wide.u32 %rd3, %r3, 4;
    add.u64 %rd4, %rd0, %rd3;
    ld.local.u32 %r4, [%rd4]; // READ
    // the same element through a generic address
    cvta.local.u64 %rd5, %rd4;
    ld.u32 %r5, [%rd5];
    mul.wide.u32 %rd6, %r0, 8;
    add.u64 %rd7, %rd9, %rd6;
    st.global.v2.u32 [%rd7], {%r4, %r5};
    ret;
}
"#;

#[test]
fn local_memory_is_per_thread_dynamically_indexed_and_bounds_checked() {
    let d = dev();
    let ptx = sm80(LOCAL);
    let out = zeros::<u32>(&d, 128);
    ok(&d, &ptx, "loc", cfg(1, 64), &[p(out), Arg::I32(0)]);
    let got: Vec<u32> = down(&d, out, 128);
    for t in 0..64u32 {
        let want = t * 100 + (t * 7) % 16;
        assert_eq!(
            (got[2 * t as usize], got[2 * t as usize + 1]),
            (want, want),
            "thread {t}"
        );
    }
    let f = fault(launch(&d, &ptx, "loc", cfg(1, 64), &[p(out), Arg::I32(16)]));
    assert_eq!(
        (f.check, f.thread, f.line),
        (Check::Memcheck, [0, 0, 0], line_of(&ptx, "// READ")),
        "{f}"
    );
    assert!(f.detail.contains("out-of-bounds local read"), "{f}");
}

const RACE: &str = r#"
.visible .entry race(.param .u64 out)
{
    .shared .align 4 .b32 s[64];
    .reg .pred %p<4>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %tid.x;
    and.b32 %r1, %r0, 31;
    mov.u32 %r2, s;
    mad.lo.u32 %r3, %r1, 4, %r2;
    setp.lt.u32 %p1, %r0, 32;
    @BODY@
    ret;
}
"#;

#[test]
fn racecheck_reports_raw_war_and_waw_hazards_from_a_missing_barrier() {
    // warp 0 runs before warp 1 reaches anything; each case touches s[lane] from both
    let cases = [
        // read-after-write: warp 0 writes, warp 1 reads
        (
            "@%p1 st.shared.u32 [%r3], %r0;\n    @!%p1 ld.shared.u32 %r4, [%r3]; // HAZARD",
            "read-after-write",
        ),
        // write-after-read: after a barrier, warp 0 reads and warp 1 overwrites
        (
            "@%p1 st.shared.u32 [%r3], %r0;\n    bar.sync 0;\n    @%p1 ld.shared.u32 %r4, [%r3];\n    @!%p1 st.shared.u32 [%r3], %r0; // HAZARD",
            "write-after-read",
        ),
        // write-after-write
        (
            "@%p1 st.shared.u32 [%r3], %r0;\n    @!%p1 st.shared.u32 [%r3], %r0; // HAZARD",
            "write-after-write",
        ),
    ];
    let d = dev();
    for (body, kind) in cases {
        let ptx = sm80(&RACE.replace("@BODY@", body));
        let f = fault(launch(&d, &ptx, "race", cfg(1, 64), &[p(0)]));
        assert_eq!(
            (f.check, f.thread, f.line),
            (Check::Racecheck, [32, 0, 0], line_of(&ptx, "// HAZARD")),
            "{f}"
        );
        assert!(
            f.detail.contains(kind)
                && f.detail.contains("thread (0,0,0)")
                && f.detail.contains("`s`+0"),
            "{f}"
        );
    }
    // the same accesses with a barrier between them
    let body = "@%p1 st.shared.u32 [%r3], %r0;\n    bar.sync 0;\n    @!%p1 ld.shared.u32 %r4, [%r3];\n    bar.sync 0;\n    @!%p1 st.shared.u32 [%r3], %r0;";
    ok(
        &d,
        &sm80(&RACE.replace("@BODY@", body)),
        "race",
        cfg(1, 64),
        &[p(0)],
    );
}

#[test]
fn racecheck_orders_a_warps_broadcast_read_before_its_bar_warp_sync() {
    // every lane of warp 0 reads s[0]; after bar.warp.sync lane 0 overwrites it: ordered
    // (9.7.13.2); without the bar.warp.sync it is a write-after-read hazard
    let body = "st.shared.u32 [%r3], %r0;\n    bar.warp.sync -1;\n    ld.shared.u32 %r4, [%r2];\n    @SYNC@\n    setp.eq.u32 %p2, %r0, 0;\n    @%p2 st.shared.u32 [%r2], %r4; // HAZARD";
    let d = dev();
    ok(
        &d,
        &sm80(&RACE.replace("@BODY@", &body.replace("@SYNC@", "bar.warp.sync -1;"))),
        "race",
        cfg(1, 32),
        &[p(0)],
    );
    let ptx = sm80(&RACE.replace("@BODY@", &body.replace("@SYNC@", "")));
    let f = fault(launch(&d, &ptx, "race", cfg(1, 32), &[p(0)]));
    assert_eq!(
        (f.check, f.line),
        (Check::Racecheck, line_of(&ptx, "// HAZARD")),
        "{f}"
    );
    assert!(f.detail.contains("write-after-read"), "{f}");
}

#[test]
fn racecheck_tracks_bytes_not_words() {
    // threads writing neighbouring 16-bit elements of one word do not race (bf16 tiles);
    // reading a neighbour's element without a barrier does
    let body = "mov.u32 %r5, %tid.x;\n    mad.lo.u32 %r6, %r5, 2, %r2;\n    st.shared.b16 [%r6], %r5;\n    ld.shared.b16 %r7, [%r6];\n    @READ@";
    let d = dev();
    ok(
        &d,
        &sm80(&RACE.replace("@BODY@", &body.replace("@READ@", ""))),
        "race",
        cfg(1, 64),
        &[p(0)],
    );
    let ptx = sm80(&RACE.replace(
        "@BODY@",
        &body.replace(
            "@READ@",
            "xor.b32 %r8, %r6, 2;\n    ld.shared.b16 %r9, [%r8]; // HAZARD",
        ),
    ));
    let f = fault(launch(&d, &ptx, "race", cfg(1, 64), &[p(0)]));
    assert_eq!(
        (f.check, f.thread, f.line),
        (Check::Racecheck, [0, 0, 0], line_of(&ptx, "// HAZARD")),
        "{f}"
    );
    assert!(f.detail.contains("thread (1,0,0)"), "{f}");
}

#[test]
fn initcheck_reports_never_written_global_and_shared_memory() {
    let d = dev();
    let ptx = sm80(COPY);
    // the second half of the input was never written
    let input = d.alloc(256, false).unwrap();
    d.htod(input, bytemuck::cast_slice(&[1.0f32; 32])).unwrap();
    let out = zeros::<f32>(&d, 64);
    let f = fault(launch(&d, &ptx, "copy", cfg(1, 64), &[p(input), p(out)]));
    assert_eq!(
        (f.check, f.thread, f.line),
        (Check::Initcheck, [32, 0, 0], line_of(&ptx, "// READ")),
        "{f}"
    );
    assert!(f.detail.contains("byte 128 of allocation"), "{f}");
    // an output the kernel never wrote, copied back to the host
    let never = d.alloc(16, false).unwrap();
    match d.dtoh(&mut [0u8; 16], never) {
        Err(SimError::Api(m)) => assert!(m.contains("initcheck"), "{m}"),
        other => panic!("expected an initcheck error, got {other:?}"),
    }
    // shared memory read before any write
    let ptx = sm80(&RACE.replace("@BODY@", "ld.shared.u32 %r4, [%r3+4]; // HAZARD"));
    let f = fault(launch(&d, &ptx, "race", cfg(1, 64), &[p(0)]));
    assert_eq!(
        (f.check, f.line),
        (Check::Initcheck, line_of(&ptx, "// HAZARD")),
        "{f}"
    );
    assert!(
        f.detail.contains("never-written shared memory: `s`+4"),
        "{f}"
    );
    // with initcheck off, the same kernels run
    let quiet = Device::new(
        Checks {
            racecheck: true,
            initcheck: false,
        },
        1 << 20,
        1,
    )
    .unwrap();
    ok(&quiet, &ptx, "race", cfg(1, 64), &[p(0)]);
}

const WIDTHS: &str = r#"
.visible .entry widths(.param .u64 in, .param .u64 out)
{
    .reg .b16 %h<8>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<24>;
    .reg .f32 %f<8>;
    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [out];
    ld.global.s8 %r1, [%rd1];
    ld.global.u8 %r2, [%rd1];
    ld.global.s8 %r3, [%rd1+1];
    ld.global.s16 %r4, [%rd1+2];
    ld.global.u16 %r5, [%rd1+2];
    ld.global.s8 %rd3, [%rd1];
    ld.global.s8 %h1, [%rd1];
    ld.global.v2.u16 {%h2, %h3}, [%rd1+4];
    ld.global.b16 %h4, [%rd1+8];
    cvt.f32.bf16 %f1, %h4;
    ld.global.v2.u32 {%r6, %r7}, [%rd1+8];
    ld.global.v4.u32 {%r8, %r9, %r10, %r11}, [%rd1+16];
    ld.global.v2.u64 {%rd4, %rd5}, [%rd1+32];
    cvt.u64.u32 %rd6, %r1;
    cvt.u64.u32 %rd7, %r2;
    cvt.u64.u32 %rd8, %r3;
    cvt.u64.u32 %rd9, %r4;
    cvt.u64.u32 %rd10, %r5;
    cvt.u64.u16 %rd11, %h1;
    cvt.u64.u16 %rd12, %h2;
    cvt.u64.u16 %rd13, %h3;
    mov.b32 %r12, %f1;
    cvt.u64.u32 %rd14, %r12;
    st.global.v2.u64 [%rd2], {%rd6, %rd7};
    st.global.v2.u64 [%rd2+16], {%rd8, %rd9};
    st.global.v2.u64 [%rd2+32], {%rd10, %rd3};
    st.global.v2.u64 [%rd2+48], {%rd11, %rd12};
    st.global.v2.u64 [%rd2+64], {%rd13, %rd14};
    st.global.v2.u64 [%rd2+80], {%rd4, %rd5};
    st.global.v4.u32 [%rd2+96], {%r8, %r9, %r10, %r11};
    // narrow stores keep the low bits
    mov.u32 %r13, 0x12345678;
    st.global.u8 [%rd2+112], %r13;
    st.global.u16 [%rd2+114], %r13;
    st.global.v2.u8 [%rd2+116], {%r13, %r6};
    ret;
}
"#;

#[test]
fn narrow_and_vector_loads_extend_by_type_and_stores_truncate() {
    // 9.7.9.8 ld: a wider destination is sign-extended for signed types, zero-extended
    // for unsigned and bit-size types
    let mut input = vec![0u8; 48];
    input[..8].copy_from_slice(&[0x80, 0x7f, 0xfe, 0xff, 0x34, 0x12, 0x00, 0x80]);
    input[8..10].copy_from_slice(&half::bf16::from_f32(1.5).to_bits().to_le_bytes());
    for (i, v) in [7u32, 0xdead_beef, 3, 0x8000_0000].iter().enumerate() {
        input[16 + 4 * i..20 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    input[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    input[40..48].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    let d = dev();
    let (gi, go) = (up(&d, &input), zeros::<u64>(&d, 15));
    ok(&d, &sm80(WIDTHS), "widths", cfg(1, 1), &[p(gi), p(go)]);
    let o: Vec<u64> = down(&d, go, 15);
    assert_eq!(o[0], 0xffff_ff80, "ld.s8 into a 32-bit register");
    assert_eq!(o[1], 0x80, "ld.u8");
    assert_eq!(o[2], 0x7f, "ld.s8 of a positive byte");
    assert_eq!(o[3], 0xffff_fffe, "ld.s16");
    assert_eq!(o[4], 0xfffe, "ld.u16");
    assert_eq!(o[5], 0xffff_ffff_ffff_ff80, "ld.s8 into a 64-bit register");
    assert_eq!(o[6], 0xff80, "ld.s8 into a 16-bit register");
    assert_eq!((o[7], o[8]), (0x1234, 0x8000), "ld.v2.u16");
    assert_eq!(o[9], 1.5f32.to_bits() as u64, "ld.b16 + cvt.f32.bf16");
    assert_eq!(
        (o[10], o[11]),
        (u64::MAX, 0x0123_4567_89ab_cdef),
        "ld.v2.u64"
    );
    let v4: Vec<u32> = bytemuck::cast_slice(&o[12..14]).to_vec();
    assert_eq!(
        v4,
        [7, 0xdead_beef, 3, 0x8000_0000],
        "ld.v4.u32 / st.v4.u32"
    );
    let tail = o[14].to_le_bytes();
    assert_eq!(tail[0], 0x78, "st.u8");
    assert_eq!(u16::from_le_bytes([tail[2], tail[3]]), 0x5678, "st.u16");
    // st.v2.u8 of {0x12345678, 0x0012 3400 | ...}: r6 = bytes 8..12 of the input
    assert_eq!((tail[4], tail[5]), (0x78, input[8]), "st.v2.u8");
}

const GENERIC: &str = r#"
.visible .entry generic(.param .u64 out)
{
    .shared .align 8 .b8 sh[256];
    .local .align 8 .b8 lo[16];
    .reg .b32 %r<16>;
    .reg .b64 %rd<16>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [out];
    // a generic address into shared memory, and back
    cvta.shared.u64 %rd2, sh;
    mul.wide.u32 %rd3, %r0, 4;
    add.u64 %rd4, %rd2, %rd3;
    mul.lo.u32 %r1, %r0, 13;
    st.u32 [%rd4], %r1;
    bar.sync 0;
    xor.b32 %r2, %r0, 1;
    mul.wide.u32 %rd5, %r2, 4;
    mov.u64 %rd6, sh;
    add.u64 %rd7, %rd6, %rd5;
    ld.shared.u32 %r3, [%rd7];
    cvta.to.shared.u64 %rd8, %rd4;
    ld.shared.u32 %r4, [%rd8];
    // local memory through a generic address
    add.u32 %r5, %r0, 1000;
    st.local.u32 [lo+4], %r5;
    mov.u64 %rd9, lo;
    cvta.local.u64 %rd10, %rd9;
    ld.u32 %r6, [%rd10+4];
    // a global pointer converted to and used as a generic address
    cvta.to.global.u64 %rd11, %rd1;
    mul.wide.u32 %rd12, %r0, 16;
    add.u64 %rd13, %rd11, %rd12;
    cvta.global.u64 %rd14, %rd13;
    st.v2.u32 [%rd14], {%r3, %r4};
    st.global.u32 [%rd13+8], %r6;
    st.u32 [%rd14+12], %r0;
    ret;
}
"#;

#[test]
fn generic_addresses_reach_shared_local_and_global_memory() {
    let d = dev();
    let go = zeros::<u32>(&d, 4 * 64);
    ok(&d, &sm80(GENERIC), "generic", cfg(1, 64), &[p(go)]);
    let o: Vec<u32> = down(&d, go, 4 * 64);
    for t in 0..64u32 {
        let r = &o[4 * t as usize..4 * t as usize + 4];
        assert_eq!(r, [(t ^ 1) * 13, t * 13, t + 1000, t], "thread {t}");
    }
}

const PARAMS: &str = r#"
.visible .entry params(.param .u64 out, .param .f32 x, .param .s32 n, .param .u64 big, .param .b32 raw)
{
    .reg .b32 %r<8>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [out];
    ld.param.f32 %f1, [x];
    ld.param.s32 %r1, [n];
    ld.param.u64 %rd2, [big];
    ld.param.b32 %r2, [raw];
    mov.b32 %r3, %f1;
    st.global.v4.u32 [%rd1], {%r3, %r1, %r2, %r2};
    st.global.u64 [%rd1+16], %rd2;
    ret;
}
"#;

#[test]
fn kernel_parameters_arrive_in_param_space() {
    let d = dev();
    let go = zeros::<u32>(&d, 6);
    let args = [
        p(go),
        Arg::F32(-2.75),
        Arg::I32(-7),
        p(0x0123_4567_89ab_cdef),
        Arg::F32(0.5),
    ];
    ok(&d, &sm80(PARAMS), "params", cfg(1, 1), &args);
    let o: Vec<u32> = down(&d, go, 6);
    assert_eq!(
        o[..3],
        [(-2.75f32).to_bits(), -7i32 as u32, 0.5f32.to_bits()]
    );
    assert_eq!((o[4], o[5]), (0x89ab_cdef, 0x0123_4567));
    // a .b32 parameter takes an integer as well
    ok(
        &d,
        &sm80(PARAMS),
        "params",
        cfg(1, 1),
        &[p(go), Arg::F32(1.0), Arg::I32(3), p(9), Arg::I32(42)],
    );
    assert_eq!(down::<u32>(&d, go, 3)[2], 42);
}

// A struct passed by value (`__grid_constant__`), as nvcc lays it out: a byte-array
// parameter whose address is taken (`mov`) and read through registers at offsets,
// including one computed from the thread index.
const TABLE: &str = r#"
.visible .entry table(.param .align 8 .b8 table_param_0[24], .param .u64 out)
{
    .reg .b32 %r<8>;
    .reg .b64 %rd<8>;
    mov.b64 %rd1, table_param_0;
    ld.param.u64 %rd2, [out];
    ld.param.u64 %rd3, [%rd1+16];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    ld.param.u32 %r2, [%rd5];
    add.s64 %rd6, %rd2, %rd4;
    st.global.u32 [%rd6], %r2;
    st.global.u64 [%rd2+16], %rd3;
    ret;
}
"#;

#[test]
fn a_struct_parameter_is_read_through_its_address() {
    let d = dev();
    let go = zeros::<u32>(&d, 6);
    let mut table = Vec::new();
    for v in [11u32, 22, 33, 44] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    table.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    ok(
        &d,
        &sm80(TABLE),
        "table",
        cfg(1, 4),
        &[Arg::Bytes(&table), p(go)],
    );
    assert_eq!(
        down::<u32>(&d, go, 6),
        [11, 22, 33, 44, 0x89ab_cdef, 0x0123_4567]
    );
    // The block must be exactly the parameter's size.
    let e = launch_error(launch(
        &d,
        &sm80(TABLE),
        "table",
        cfg(1, 4),
        &[Arg::Bytes(&table[..16]), p(go)],
    ));
    assert!(e.contains("table_param_0") && e.contains("24 bytes"), "{e}");
}

const GLOBALS: &str = r#"
.global .align 4 .u32 gtab[4] = {1, 2, 3, 0xffffffff};
.global .align 4 .s32 neg[2] = {-5, 7};
.const .align 4 .f32 ctab[3] = {0f3FC00000, 0f40000000, 2.5};
.const .align 8 .f64 dtab[2] = {0d3FF8000000000000, 0.25};
.const .align 2 .b16 htab[2] = {0x3c00, 0xc000};
.global .align 4 .u32 counter;

.visible .entry count()
{
    .reg .b32 %r<4>;
    atom.global.add.u32 %r1, [counter], 1;
    ret;
}

.visible .entry dump(.param .u64 out)
{
    .reg .b16 %h<4>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<16>;
    ld.param.u64 %rd1, [out];
    ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [gtab];
    st.global.v4.u32 [%rd1], {%r1, %r2, %r3, %r4};
    mov.u64 %rd2, neg;
    ld.global.v2.u32 {%r5, %r6}, [%rd2];
    ld.const.v2.b32 {%r7, %r8}, [ctab];
    ld.const.b32 %r9, [ctab+8];
    ld.const.v2.b16 {%h1, %h2}, [htab];
    cvt.u32.u16 %r10, %h1;
    cvt.u32.u16 %r11, %h2;
    ld.global.u32 %r12, [counter];
    st.global.v4.u32 [%rd1+16], {%r5, %r6, %r7, %r8};
    st.global.v4.u32 [%rd1+32], {%r9, %r10, %r11, %r12};
    ld.const.v2.b64 {%rd3, %rd4}, [dtab];
    st.global.v2.u64 [%rd1+48], {%rd3, %rd4};
    ret;
}
"#;

#[test]
fn module_level_global_and_const_variables_with_initialisers() {
    let d = dev();
    let m = d.load_module("globals", &sm80(GLOBALS)).unwrap();
    let (count, dump) = (
        d.function(&m, "count").unwrap(),
        d.function(&m, "dump").unwrap(),
    );
    d.launch(&count, cfg(3, 100), &[]).unwrap();
    let go = zeros::<u32>(&d, 16);
    d.launch(&dump, cfg(1, 1), &[p(go)]).unwrap();
    let o: Vec<u32> = down(&d, go, 16);
    assert_eq!(o[..4], [1, 2, 3, u32::MAX], ".global .u32 array");
    assert_eq!(o[4..6], [-5i32 as u32, 7], "negative initialisers");
    assert_eq!(
        o[6..9],
        [1.5f32.to_bits(), 2.0f32.to_bits(), 2.5f32.to_bits()],
        ".const .f32 (hex and decimal literals)"
    );
    assert_eq!(o[9..11], [0x3c00, 0xc000], ".const .b16");
    assert_eq!(
        o[11], 300,
        "a zero-initialised .global counter keeps its value between launches"
    );
    let f64s: Vec<f64> = bytemuck::cast_slice(&o[12..16]).to_vec();
    assert_eq!(f64s, [1.5, 0.25], ".const .f64");
}
