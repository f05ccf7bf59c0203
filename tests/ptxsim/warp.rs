//! 2. Warp collectives (9.7.9.6 shfl.sync, 9.7.13.9 vote.sync, 9.7.13.11 activemask,
//!    9.7.13.2 bar.warp.sync), divergence and reconvergence

use super::*;

const SHFL: &str = r#"
.visible .entry shfl(.param .u64 out, .param .u32 b, .param .u32 c)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [b];
    ld.param.u32 %r2, [c];
    mov.u32 %r3, %laneid;
    mad.lo.u32 %r4, %r3, 10, 7;
    shfl.sync.@MODE@.b32 %r5|%p1, %r4, %r1, %r2, 0xffffffff;
    selp.u32 %r6, 1, 0, %p1;
    mul.wide.u32 %rd2, %r3, 8;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r5, %r6};
    ret;
}
"#;

fn shfl(mode: &str, b: u32, c: u32) -> Vec<(u32, bool)> {
    let d = dev();
    let out = zeros::<u32>(&d, 64);
    ok(
        &d,
        &sm80(&SHFL.replace("@MODE@", mode)),
        "shfl",
        cfg(1, 32),
        &[p(out), Arg::I32(b as i32), Arg::I32(c as i32)],
    );
    down::<u32>(&d, out, 64)
        .chunks(2)
        .map(|x| (x[0], x[1] != 0))
        .collect()
}

/// The c operand CUDA's intrinsics pass for a segment `width` (sm_30_intrinsics.hpp).
fn c_of(width: u32, up: bool) -> u32 {
    ((32 - width) << 8) | if up { 0 } else { 0x1f }
}

#[test]
fn shfl_sync_modes_with_segments_clamps_and_the_lane_predicate() {
    let v = |l: usize| (l * 10 + 7) as u32;
    // CUDA's documented behaviour for each width (a lane reads within its own segment of
    // `width` lanes; out of range it keeps its value and the predicate is false)
    for width in [32u32, 16, 8] {
        let w = width as usize;
        let down = shfl("down", 3, c_of(width, false));
        let up = shfl("up", 5, c_of(width, true));
        let bfly = shfl("bfly", 6, c_of(width, false));
        let idx = shfl("idx", 35, c_of(width, false)); // b[4:0] = 3
        for l in 0..32 {
            let inside = |j: usize| j / w == l / w;
            let want = |j: Option<usize>| match j {
                Some(j) if j < 32 && inside(j) => (v(j), true),
                _ => (v(l), false),
            };
            assert_eq!(down[l], want(Some(l + 3)), "down width {width} lane {l}");
            assert_eq!(up[l], want(l.checked_sub(5)), "up width {width} lane {l}");
            assert_eq!(bfly[l], want(Some(l ^ 6)), "bfly width {width} lane {l}");
            assert_eq!(
                idx[l],
                (v((l / w) * w + 3 % w), true),
                "idx width {width} lane {l}"
            );
        }
    }
    // bfly with a lane mask beyond the segment: lanes may read earlier segments but not
    // later ones (CUDA programming guide, __shfl_xor_sync)
    let x = shfl("bfly", 9, c_of(8, false));
    assert_eq!(x[0], (v(0), false));
    assert_eq!(x[8], (v(1), true));
    assert_eq!(x[17], (v(17), false)); // 17 ^ 9 = 24 lies in the next segment
    assert_eq!(x[25], (v(16), true));
    // a clamp below the segment end: .down c = 0x1f with segmask 0 but clamp 20
    let clamp = shfl("down", 4, 20);
    for (l, &got) in clamp.iter().enumerate() {
        let want = if l + 4 <= 20 {
            (v(l + 4), true)
        } else {
            (v(l), false)
        };
        assert_eq!(got, want, "down clamp 20 lane {l}");
    }
    // the manual's formula, swept over b and c (incl. bits beyond b[4:0] and c's fields)
    for (mode, b, c) in [
        ("idx", 7u32, 0x0000_1c1fu32),
        ("up", 33, 0x0800),
        ("down", 1, 0x0e07),
        ("idx", 70, 0x1f00),
    ] {
        let got = shfl(mode, b, c);
        let (bval, cval, seg) = ((b & 31) as i64, (c & 31) as i64, ((c >> 8) & 31) as i64);
        for (l, &g) in got.iter().enumerate() {
            let li = l as i64;
            let (max_lane, min_lane) = ((li & seg) | (cval & !seg), li & seg);
            let (j, ok) = match mode {
                "up" => (li - bval, li - bval >= max_lane),
                "down" => (li + bval, li + bval <= max_lane),
                "bfly" => (li ^ bval, (li ^ bval) <= max_lane),
                _ => (
                    min_lane | (bval & !seg),
                    (min_lane | (bval & !seg)) <= max_lane,
                ),
            };
            let want = if ok {
                (v(j as usize), true)
            } else {
                (v(l), false)
            };
            assert_eq!(g, want, "{mode} b={b} c={c:#x} lane {l}");
        }
    }
}

const VOTE: &str = r#"
.visible .entry vote(.param .u64 in, .param .u64 out)
{
    .reg .pred %p<8>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [out];
    mul.wide.u32 %rd3, %r0, 4;
    add.u64 %rd4, %rd1, %rd3;
    ld.global.u32 %r1, [%rd4];
    setp.ne.u32 %p1, %r1, 0;
    vote.sync.all.pred %p2, %p1, 0xffffffff;
    vote.sync.any.pred %p3, %p1, 0xffffffff;
    vote.sync.uni.pred %p4, %p1, 0xffffffff;
    vote.sync.ballot.b32 %r2, %p1, 0xffffffff;
    vote.sync.ballot.b32 %r3, !%p1, 0xffffffff;
    selp.u32 %r4, 1, 0, %p2;
    selp.u32 %r5, 1, 0, %p3;
    selp.u32 %r6, 1, 0, %p4;
    // a half-warp vote: lanes 0..15 only, member mask 0x0000ffff
    mov.u32 %r7, 0;
    mov.u32 %r8, 0;
    setp.lt.u32 %p5, %r0, 16;
    @!%p5 bra $SKIP;
    vote.sync.ballot.b32 %r7, %p1, 0x0000ffff;
    vote.sync.all.pred %p6, %p1, 0x0000ffff;
    selp.u32 %r8, 1, 0, %p6;
$SKIP:
    mul.wide.u32 %rd5, %r0, 32;
    add.u64 %rd6, %rd2, %rd5;
    st.global.v4.u32 [%rd6], {%r4, %r5, %r6, %r2};
    st.global.v4.u32 [%rd6+16], {%r3, %r7, %r8, %r0};
    ret;
}
"#;

#[test]
fn vote_sync_all_any_uni_ballot_over_the_member_mask() {
    let cases: [[bool; 32]; 4] = [
        [true; 32],
        [false; 32],
        std::array::from_fn(|l| l % 3 == 0),
        std::array::from_fn(|l| l < 16 || l == 31),
    ];
    for pred in cases {
        let d = dev();
        let input: Vec<u32> = pred.iter().map(|&b| b as u32).collect();
        let (gi, go) = (up(&d, &input), zeros::<u32>(&d, 256));
        ok(&d, &sm80(VOTE), "vote", cfg(1, 32), &[p(gi), p(go)]);
        let out: Vec<u32> = down(&d, go, 256);
        let ballot: u32 = (0..32).filter(|&l| pred[l]).map(|l| 1u32 << l).sum();
        let (all, any) = (pred.iter().all(|&b| b), pred.iter().any(|&b| b));
        let half = ballot & 0xffff;
        for l in 0..32 {
            let o = &out[l * 8..l * 8 + 8];
            assert_eq!(o[0], all as u32, "all, lane {l}");
            assert_eq!(o[1], any as u32, "any");
            assert_eq!(o[2], (all || !any) as u32, "uni");
            assert_eq!(o[3], ballot, "ballot");
            assert_eq!(o[4], !ballot, "ballot of !p");
            if l < 16 {
                assert_eq!(
                    o[5], half,
                    "half-warp ballot: lanes outside the mask give 0"
                );
                assert_eq!(o[6], (half == 0xffff) as u32, "half-warp all");
            }
        }
    }
}

const DIVERGE: &str = r#"
.visible .entry diverge(.param .u64 out)
{
    .reg .pred %p<8>;
    .reg .b32 %r<24>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [out];
    mov.u32 %r10, 0;
    mov.u32 %r11, 0;
    and.b32 %r1, %r0, 1;
    setp.eq.u32 %p1, %r1, 0;
    @%p1 bra $EVEN;
    activemask.b32 %r10;
    setp.lt.u32 %p2, %r0, 16;
    @%p2 bra $ODD_LO;
    add.u32 %r2, %r0, 200;
    bra.uni $JOIN;
$ODD_LO:
    activemask.b32 %r11;
    add.u32 %r2, %r0, 100;
    bra.uni $JOIN;
$EVEN:
    // a loop whose trip count depends on the lane: ceil(lane / 2) iterations
    mov.u32 %r2, 0;
    mov.u32 %r3, 0;
$LOOP:
    setp.ge.u32 %p3, %r3, %r0;
    @%p3 bra $JOIN;
    add.u32 %r2, %r2, 3;
    add.u32 %r3, %r3, 2;
    bra.uni $LOOP;
$JOIN:
    activemask.b32 %r12;
    shfl.sync.bfly.b32 %r13, %r2, 1, 0x1f, 0xffffffff;
    vote.sync.ballot.b32 %r14, %p1, 0xffffffff;
    mul.wide.u32 %rd2, %r0, 32;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r2, %r13, %r12, %r14};
    st.global.v4.u32 [%rd3+16], {%r10, %r11, %r0, %r0};
    ret;
}
"#;

#[test]
fn divergent_branches_and_loops_reconverge_before_warp_collectives() {
    let d = dev();
    let go = zeros::<u32>(&d, 256);
    ok(&d, &sm80(DIVERGE), "diverge", cfg(1, 32), &[p(go)]);
    let out: Vec<u32> = down(&d, go, 256);
    let v = |l: u32| match (l % 2, l < 16) {
        (1, true) => 100 + l,
        (1, false) => 200 + l,
        _ => 3 * l.div_ceil(2),
    };
    for l in 0..32u32 {
        let o = &out[l as usize * 8..l as usize * 8 + 8];
        assert_eq!(o[0], v(l), "value of lane {l}");
        assert_eq!(o[1], v(l ^ 1), "shfl after reconvergence, lane {l}");
        assert_eq!(o[2], u32::MAX, "activemask after reconvergence");
        assert_eq!(o[3], 0x5555_5555, "ballot after reconvergence");
        if l % 2 == 1 {
            assert_eq!(o[4], 0xaaaa_aaaa, "activemask in the odd branch");
        }
        if l % 2 == 1 && l < 16 {
            assert_eq!(o[5], 0x0000_aaaa, "activemask in the nested branch");
        }
    }
}

const BARWARP: &str = r#"
.visible .entry bw(.param .u64 out)
{
    .shared .align 4 .b32 s[32];
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, s;
    mad.lo.u32 %r2, %r0, 4, %r1;
    mul.lo.u32 %r3, %r0, %r0;
    st.shared.u32 [%r2], %r3;
    @SYNC@
    add.u32 %r4, %r0, 1;
    and.b32 %r4, %r4, 31;
    mad.lo.u32 %r5, %r4, 4, %r1;
    ld.shared.u32 %r6, [%r5]; // READ
    mul.wide.u32 %rd2, %r0, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r6;
    ret;
}
"#;

#[test]
fn bar_warp_sync_orders_shared_memory_within_a_warp() {
    // 9.7.13.2: bar.warp.sync guarantees memory ordering among the threads of the mask;
    // without it a lane reading its neighbour's store is a hazard.
    let d = dev();
    let go = zeros::<u32>(&d, 32);
    ok(
        &d,
        &sm80(&BARWARP.replace("@SYNC@", "bar.warp.sync 0xffffffff;")),
        "bw",
        cfg(1, 32),
        &[p(go)],
    );
    let want: Vec<u32> = (0..32u32).map(|l| ((l + 1) % 32).pow(2)).collect();
    assert_eq!(down::<u32>(&d, go, 32), want);
    let ptx = sm80(&BARWARP.replace("@SYNC@", ""));
    let f = fault(launch(&d, &ptx, "bw", cfg(1, 32), &[p(go)]));
    assert_eq!(f.check, Check::Racecheck, "{f}");
    assert_eq!(f.line, line_of(&ptx, "// READ"));
    assert!(f.detail.contains("read-after-write"), "{f}");
}

const SPLIT: &str = r#"
.visible .entry split(.param .u64 out)
{
    .shared .align 4 .b32 s[32];
    .reg .pred %p<3>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, s;
    mad.lo.u32 %r2, %r0, 4, %r1;
    setp.lt.u32 %p1, %r0, 16;
    @%p1 bra $LO;
    mul.lo.u32 %r3, %r0, 3;
    st.shared.u32 [%r2], %r3;
    bar.warp.sync 0xffffffff;
    shfl.sync.bfly.b32 %r4, %r3, 16, 0x1f, 0xffffffff;
    bra.uni $JOIN;
$LO:
    mul.lo.u32 %r5, %r0, 2;
    st.shared.u32 [%r2], %r5;
    bar.warp.sync 0xffffffff;
    shfl.sync.bfly.b32 %r4, %r5, 16, 0x1f, 0xffffffff;
$JOIN:
    xor.b32 %r6, %r0, 16;
    mad.lo.u32 %r7, %r6, 4, %r1;
    ld.shared.u32 %r8, [%r7];
    mul.wide.u32 %rd2, %r0, 8;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r4, %r8};
    ret;
}
"#;

#[test]
fn collectives_in_divergent_branches_pair_up_on_sm70() {
    // 9.7.9.6 / 9.7.13.2: a thread waits until the members "have executed shfl.sync
    // (bar.warp.sync) with the same qualifiers and same membermask" - not the same
    // instruction, which only sm_6x requires. Each half-warp reaches its own
    // bar.warp.sync and shfl.sync; they complete together, each lane sourcing `a` from
    // the other half's instruction.
    let d = dev();
    let go = zeros::<u32>(&d, 64);
    ok(&d, &sm80(SPLIT), "split", cfg(1, 32), &[p(go)]);
    let out: Vec<u32> = down(&d, go, 64);
    for l in 0..32u32 {
        let src = if l ^ 16 < 16 {
            (l ^ 16) * 2
        } else {
            (l ^ 16) * 3
        };
        assert_eq!(
            (out[2 * l as usize], out[2 * l as usize + 1]),
            (src, src),
            "lane {l}"
        );
    }
}

const LATE_EXIT: &str = r#"
.visible .entry late(.param .u64 out)
{
    .reg .pred %p<3>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [out];
    setp.ge.u32 %p1, %r0, 16;
    @%p1 bra $LATE;
    mul.lo.u32 %r1, %r0, 5;
    shfl.sync.bfly.b32 %r2, %r1, 1, 0x1f, 0xffffffff;
    setp.ne.u32 %p2, %r0, 3;
    vote.sync.ballot.b32 %r3, %p2, 0xffffffff;
    mul.wide.u32 %rd2, %r0, 8;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r2, %r3};
    ret;
$LATE:
    add.u32 %r4, %r0, 1;
    ret;
}
"#;

#[test]
fn collectives_do_not_wait_for_lanes_that_exit_later() {
    // 9.7.9.6 / 9.7.13.9: the wait is for the non-exited threads of the member mask. The
    // low half-warp reaches shfl.sync first; the high half exits afterwards.
    let d = dev();
    let go = zeros::<u32>(&d, 64);
    ok(&d, &sm80(LATE_EXIT), "late", cfg(1, 32), &[p(go)]);
    let out: Vec<u32> = down(&d, go, 64);
    for l in 0..16u32 {
        assert_eq!(out[2 * l as usize], (l ^ 1) * 5, "shfl, lane {l}");
        assert_eq!(
            out[2 * l as usize + 1],
            0xffff & !(1 << 3),
            "ballot over the live lanes"
        );
    }
}

const PARTIAL: &str = r#"
.visible .entry partial(.param .u64 out)
{
    .shared .align 4 .b32 s[64];
    .reg .pred %p<2>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [out];
    setp.ge.u32 %p1, %r0, 0;
    vote.sync.ballot.b32 %r1, %p1, 0xffffffff;
    shfl.sync.idx.b32 %r2, %r0, 0, 0x1f, 0xffffffff;
    mov.u32 %r3, s;
    mad.lo.u32 %r4, %r0, 4, %r3;
    mul.lo.u32 %r5, %r0, 11;
    st.shared.u32 [%r4], %r5;
    bar.sync 0;
    mov.u32 %r6, %ntid.x;
    sub.u32 %r7, %r6, 1;
    sub.u32 %r7, %r7, %r0;
    mad.lo.u32 %r8, %r7, 4, %r3;
    ld.shared.u32 %r9, [%r8];
    mov.u32 %r10, %warpid;
    mov.u32 %r11, %laneid;
    mul.wide.u32 %rd2, %r0, 32;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r1, %r2, %r9, %r10};
    st.global.v4.u32 [%rd3+16], {%r11, %r6, %r0, %r0};
    ret;
}
"#;

#[test]
fn a_partial_last_warp_has_only_its_existing_lanes() {
    let ptx = sm80(PARTIAL);
    let d = dev();
    let go = zeros::<u32>(&d, 40 * 8);
    ok(&d, &ptx, "partial", cfg(1, 40), &[p(go)]);
    let out: Vec<u32> = down(&d, go, 40 * 8);
    for t in 0..40u32 {
        let o = &out[t as usize * 8..t as usize * 8 + 8];
        let (warp, lane) = (t / 32, t % 32);
        assert_eq!(
            o[0],
            if warp == 0 { u32::MAX } else { 0xff },
            "ballot of thread {t}"
        );
        assert_eq!(o[1], warp * 32, "broadcast from lane 0");
        assert_eq!(o[2], (39 - t) * 11, "exchange through shared memory");
        assert_eq!((o[3], o[4], o[5]), (warp, lane, 40));
    }
}

/// Run `f` on another thread; a panic if it takes more than `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

const SPINLOCK: &str = r#"
.visible .entry spin(.param .u64 g)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [g];
$SPIN:
    atom.global.cas.b32 %r1, [%rd1], 0, 1;
    setp.ne.u32 %p1, %r1, 0;
    @%p1 bra $SPIN;
    // the critical section: a plain read-modify-write of the counter
    ld.global.u32 %r2, [%rd1+4];
    add.u32 %r2, %r2, 1;
    st.global.u32 [%rd1+4], %r2;
    atom.global.exch.b32 %r3, [%rd1], 0;
    ret;
}
"#;

#[test]
fn a_spinlock_between_lanes_of_one_warp_makes_progress() {
    // 3.2 (independent thread scheduling): a lane spinning on a lock another lane of its
    // warp holds must let the holder run (starvation-free algorithms)
    let got = within(20, || {
        let d = dev();
        let g = up(&d, &[0u32, 0]);
        ok(&d, &sm80(SPINLOCK), "spin", cfg(4, 64), &[p(g)]);
        down::<u32>(&d, g, 2)
    });
    assert_eq!(got, [0, 4 * 64]);
}

const FLAG: &str = r#"
.visible .entry flag(.param .u64 g)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [g];
    mov.u32 %r0, %tid.x;
    setp.ge.u32 %p1, %r0, 32;
    @%p1 bra $SETTER;
    // warp 0 waits for warp 1's flag, without a barrier
$WAIT:
    ld.volatile.global.u32 %r1, [%rd1];
    setp.eq.u32 %p1, %r1, 0;
    @%p1 bra $WAIT;
    ld.global.u32 %r2, [%rd1+4];
    st.global.u32 [%rd1+8], %r2;
    ret;
$SETTER:
    mov.u32 %r3, 77;
    st.global.u32 [%rd1+4], %r3;
    membar.cta;
    atom.global.exch.b32 %r4, [%rd1], 1;
    ret;
}
"#;

#[test]
fn a_warp_spinning_on_a_flag_lets_the_other_warps_of_its_block_run() {
    let got = within(20, || {
        let d = dev();
        let g = up(&d, &[0u32, 0, 0]);
        ok(&d, &sm80(FLAG), "flag", cfg(1, 64), &[p(g)]);
        down::<u32>(&d, g, 3)
    });
    assert_eq!(got, [1, 77, 77]);
}
