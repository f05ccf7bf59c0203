//! 9. Speed

use super::*;

const SAXPY: &str = r#"
.visible .entry saxpy(.param .u64 x, .param .u64 y, .param .f32 a, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %tid.x;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mad.lo.u32 %r3, %r1, %r2, %r0;
    ld.param.u32 %r4, [n];
    setp.ge.u32 %p1, %r3, %r4;
    @%p1 bra $END;
    ld.param.u64 %rd1, [x];
    ld.param.u64 %rd2, [y];
    ld.param.f32 %f1, [a];
    mul.wide.u32 %rd3, %r3, 4;
    add.u64 %rd4, %rd1, %rd3;
    add.u64 %rd5, %rd2, %rd3;
    ld.global.f32 %f2, [%rd4];
    ld.global.f32 %f3, [%rd5];
    fma.rn.f32 %f3, %f1, %f2, %f3;
    st.global.f32 [%rd5], %f3;
$END:
    ret;
}
"#;

#[test]
fn a_large_elementwise_grid_runs_quickly() {
    let (blocks, threads) = (2048u32, 256u32);
    let n = (blocks * threads) as usize;
    let d = dev();
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let y: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let (px, py) = (up(&d, &x), up(&d, &y));
    let m = d.load_module("saxpy", &sm80(SAXPY)).unwrap();
    let f = d.function(&m, "saxpy").unwrap();
    let start = std::time::Instant::now();
    d.launch(
        &f,
        cfg(blocks, threads),
        &[p(px), p(py), Arg::F32(2.0), Arg::I32(n as i32)],
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    // 20 instructions per thread
    let rate = 20.0 * n as f64 / secs;
    println!(
        "saxpy over {blocks} x {threads} threads: {secs:.3} s, {:.1} M lane-instructions/s",
        rate / 1e6
    );
    assert!(secs < 20.0, "a pathological slowdown: {secs:.1} s");
    let got: Vec<f32> = down(&d, py, n);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &v)| v == 2.0 * (i % 1000) as f32 + (i % 7) as f32)
    );
}

#[test]
fn float_atomic_add_flushes_subnormals_on_global_memory_only() {
    // 9.7.13.5: atom/red.add.f32 on global memory flushes subnormal inputs and results;
    // on shared memory it supports them
    let ptx = sm80(
        r#"
.visible .entry fadd(.param .u64 g)
{
    .shared .align 4 .f32 s;
    .reg .f32 %f<4>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [g];
    mov.f32 %f0, 0f00000000;
    st.shared.f32 [s], %f0;
    mov.b32 %f1, 0x00000100;
    red.global.add.f32 [%rd1], %f1;
    red.shared.add.f32 [s], %f1;
    ld.shared.f32 %f2, [s];
    st.global.f32 [%rd1+4], %f2;
    ret;
}
"#,
    );
    let d = dev();
    let g = zeros::<u32>(&d, 2);
    ok(&d, &ptx, "fadd", cfg(1, 1), &[p(g)]);
    assert_eq!(down::<u32>(&d, g, 2), [0, 0x100]);
}

const SPECIALS: &str = r#"
.visible .entry specials(.param .u64 out)
{
    .reg .b32 %r<24>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %tid.x;
    mov.u32 %r1, %tid.y;
    mov.u32 %r2, %tid.z;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %ntid.y;
    mov.u32 %r5, %ntid.z;
    mov.u32 %r6, %ctaid.x;
    mov.u32 %r7, %ctaid.y;
    mov.u32 %r8, %ctaid.z;
    mov.u32 %r9, %nctaid.x;
    mov.u32 %r10, %nctaid.y;
    mov.u32 %r11, %laneid;
    mov.u32 %r12, %warpid;
    mov.u32 %r13, %nwarpid;
    mov.u32 %r14, %lanemask_lt;
    mov.u32 %r15, %lanemask_ge;
    // linear thread and block indices
    mad.lo.u32 %r16, %r2, %r4, %r1;
    mad.lo.u32 %r16, %r16, %r3, %r0;
    mad.lo.u32 %r17, %r8, %r10, %r7;
    mad.lo.u32 %r17, %r17, %r9, %r6;
    mul.lo.u32 %r18, %r3, %r4;
    mul.lo.u32 %r18, %r18, %r5;
    mad.lo.u32 %r19, %r17, %r18, %r16;
    mul.wide.u32 %rd1, %r19, 32;
    ld.param.u64 %rd2, [out];
    add.u64 %rd3, %rd2, %rd1;
    // a 64-bit register from two halves and back
    mov.b64 %rd4, {%r16, %r17};
    mov.b64 {%r20, %r21}, %rd4;
    st.global.v4.u32 [%rd3], {%r16, %r17, %r11, %r12};
    st.global.v4.u32 [%rd3+16], {%r13, %r14, %r15, %r21};
    ret;
}
"#;

#[test]
fn special_registers_in_a_three_dimensional_launch() {
    let (grid, block) = ([2u32, 3, 2], [5u32, 4, 3]);
    let nb = (block[0] * block[1] * block[2]) as usize;
    let total = nb * (grid[0] * grid[1] * grid[2]) as usize;
    let d = dev();
    let go = zeros::<u32>(&d, total * 8);
    ok(
        &d,
        &sm80(SPECIALS),
        "specials",
        LaunchConfig {
            grid,
            block,
            shared_bytes: 0,
        },
        &[p(go)],
    );
    let o: Vec<u32> = down(&d, go, total * 8);
    for i in 0..total {
        let r = &o[8 * i..8 * i + 8];
        let (t, b) = (i % nb, i / nb);
        let lane = t % 32;
        assert_eq!(
            (r[0] as usize, r[1] as usize),
            (t, b),
            "linear indices of thread {i}"
        );
        assert_eq!(
            (r[2] as usize, r[3] as usize, r[4] as usize),
            (lane, t / 32, nb.div_ceil(32)),
            "lane, warp, warps"
        );
        assert_eq!(
            (r[5], r[6]),
            ((1u32 << lane) - 1, !((1u32 << lane) - 1)),
            "lane masks"
        );
        assert_eq!(r[7] as usize, b, "mov.b64 unpacks the high half");
    }
}

#[test]
fn a_fault_names_three_dimensional_block_and_thread_coordinates() {
    let ptx = sm80(
        r#"
.visible .entry k3(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %tid.z;
    mov.u32 %r1, %ctaid.y;
    mov.u32 %r2, %tid.x;
    add.u32 %r3, %r0, %r1;
    add.u32 %r3, %r3, %r2;
    setp.eq.u32 %p1, %r3, 7;
    ld.param.u64 %rd1, [out];
    @%p1 ld.global.u32 %r3, [%rd1+-4]; // BAD
    ret;
}
"#,
    );
    let d = dev();
    let go = zeros::<u32>(&d, 4);
    let f = fault(launch(
        &d,
        &ptx,
        "k3",
        LaunchConfig {
            grid: [1, 4, 1],
            block: [4, 2, 8],
            shared_bytes: 0,
        },
        &[p(go)],
    ));
    // the lowest block with a faulting thread is (0,0,0); its first such thread in linear
    // order (x fastest, then y, then z) has x + z = 7 with x < 4: (3,0,4), thread 35
    assert_eq!(
        (f.check, f.block, f.thread, f.line),
        (
            Check::Memcheck,
            [0, 0, 0],
            [3, 0, 4],
            line_of(&ptx, "// BAD")
        ),
        "{f}"
    );
}

#[test]
fn float_literals_in_bit_typed_instructions_keep_their_bits() {
    // 4.5.1: 0fXXXXXXXX and 0dXXXXXXXXXXXXXXXX are bit patterns of f32 and f64 values
    let ptx = sm80(
        r#"
.visible .entry lit(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [out];
    mov.b32 %r1, 0f3FC00000;
    setp.eq.u32 %p1, %r1, %r1;
    selp.b32 %r2, 0fBF800000, 0f00000000, %p1;
    mov.b64 %rd2, 0d4004000000000000;
    st.global.v2.u32 [%rd1], {%r1, %r2};
    st.global.u64 [%rd1+8], %rd2;
    ret;
}
"#,
    );
    let d = dev();
    let go = zeros::<u32>(&d, 4);
    ok(&d, &ptx, "lit", cfg(1, 1), &[p(go)]);
    let o: Vec<u32> = down(&d, go, 4);
    assert_eq!(o[..2], [1.5f32.to_bits(), (-1.0f32).to_bits()]);
    assert_eq!(o[2] as u64 | (o[3] as u64) << 32, 2.5f64.to_bits());
}
