//! 3. Barriers (9.7.13.1 bar / barrier) and synccheck

use super::*;

const EXCHANGE: &str = r#"
.visible .entry exchange(.param .u64 out)
{
    .shared .align 4 .b32 s[256];
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, s;
    mad.lo.u32 %r2, %r0, 4, %r1;
    mul.lo.u32 %r3, %r0, 3;
    st.shared.u32 [%r2], %r3;
    @SYNC@
    mov.u32 %r4, %ntid.x;
    sub.u32 %r5, %r4, 1;
    sub.u32 %r5, %r5, %r0;
    mad.lo.u32 %r6, %r5, 4, %r1;
    ld.shared.u32 %r7, [%r6]; // READ
    mul.wide.u32 %rd2, %r0, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r7;
    ret;
}
"#;

#[test]
fn bar_sync_exchanges_shared_memory_across_warps() {
    let d = dev();
    let go = zeros::<u32>(&d, 256);
    for sync in [
        "bar.sync 0;",
        "barrier.sync 0;",
        "barrier.sync.aligned 0;",
        "bar.cta.sync 0;",
    ] {
        ok(
            &d,
            &sm80(&EXCHANGE.replace("@SYNC@", sync)),
            "exchange",
            cfg(3, 256),
            &[p(go)],
        );
        let want: Vec<u32> = (0..256).map(|t| (255 - t) * 3).collect();
        assert_eq!(down::<u32>(&d, go, 256), want, "{sync}");
    }
}

const NAMED: &str = r#"
.visible .entry named(.param .u64 out)
{
    .shared .align 4 .b32 s[128];
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, s;
    mad.lo.u32 %r2, %r0, 4, %r1;
    mul.lo.u32 %r3, %r0, 5;
    st.shared.u32 [%r2], %r3;
    // warps 0 and 1 meet at barrier 1, warps 2 and 3 at barrier 2, 64 threads each
    shr.u32 %r4, %r0, 6;
    add.u32 %r4, %r4, 1;
    bar.sync %r4, 64;
    xor.b32 %r5, %r0, 32;
    mad.lo.u32 %r6, %r5, 4, %r1;
    ld.shared.u32 %r7, [%r6];
    mul.wide.u32 %rd2, %r0, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r7;
    ret;
}
"#;

#[test]
fn named_barriers_with_thread_counts_synchronise_subsets_of_warps() {
    let d = dev();
    let go = zeros::<u32>(&d, 128);
    ok(&d, &sm80(NAMED), "named", cfg(2, 128), &[p(go)]);
    let want: Vec<u32> = (0..128).map(|t| (t ^ 32) * 5).collect();
    assert_eq!(down::<u32>(&d, go, 128), want);
}

const PRODUCER: &str = r#"
.visible .entry prodcons(.param .u64 out)
{
    .shared .align 4 .b32 s[32];
    .reg .pred %p<2>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %tid.x;
    mov.u32 %r1, %laneid;
    ld.param.u64 %rd1, [out];
    mov.u32 %r2, s;
    mad.lo.u32 %r3, %r1, 4, %r2;
    setp.lt.u32 %p1, %r0, 32;
    @%p1 bra $CONSUMER;
    // the producer (warp 1) fills the buffer and arrives without waiting
    mad.lo.u32 %r4, %r1, 9, 1;
    st.shared.u32 [%r3], %r4;
    bar.arrive 1, 64;
    ret;
$CONSUMER:
    bar.sync 1, 64;
    xor.b32 %r5, %r1, 31;
    mad.lo.u32 %r6, %r5, 4, %r2;
    ld.shared.u32 %r7, [%r6];
    mul.wide.u32 %rd2, %r1, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r7;
    ret;
}
"#;

#[test]
fn bar_arrive_lets_a_producer_warp_hand_data_to_a_consumer_warp() {
    // 9.7.13.1: arrive marks the warp's arrival without waiting; the consumer's
    // bar.sync with the same count completes when both warps have arrived.
    let d = dev();
    let go = zeros::<u32>(&d, 32);
    ok(&d, &sm80(PRODUCER), "prodcons", cfg(1, 64), &[p(go)]);
    let want: Vec<u32> = (0..32).map(|l| (l ^ 31) * 9 + 1).collect();
    assert_eq!(down::<u32>(&d, go, 32), want);
}

#[test]
fn a_partial_warp_counts_as_a_whole_warp_at_a_barrier_with_a_thread_count() {
    // 9.7.13.1: arrivals are per warp; the 16-thread last warp of a 48-thread block
    // completes `bar.sync 1, 64` with the full first warp, and its `bar.arrive 1, 64`
    // releases a consumer warp
    let d = dev();
    let go = zeros::<u32>(&d, 48);
    let ptx = sm80(&EXCHANGE.replace("@SYNC@", "bar.sync 1, 64;"));
    ok(&d, &ptx, "exchange", cfg(1, 48), &[p(go)]);
    let want: Vec<u32> = (0..48).map(|t| (47 - t) * 3).collect();
    assert_eq!(down::<u32>(&d, go, 48), want);
    // the producer warp has lanes 0..15 only: the consumer reads those
    let go = zeros::<u32>(&d, 32);
    let ptx = sm80(&PRODUCER.replace("xor.b32 %r5, %r1, 31;", "and.b32 %r5, %r1, 15;"));
    ok(&d, &ptx, "prodcons", cfg(1, 48), &[p(go)]);
    let want: Vec<u32> = (0..32).map(|l| (l & 15) * 9 + 1).collect();
    assert_eq!(down::<u32>(&d, go, 32), want);
}

const EARLY_EXIT: &str = r#"
.visible .entry early(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [out];
    setp.ge.u32 %p1, %r0, 40;
    @%p1 ret; // EXIT
    bar.sync 0; // BARRIER
    mul.wide.u32 %rd2, %r0, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r0;
    ret;
}
"#;

#[test]
fn synccheck_reports_a_barrier_that_threads_exited_before() {
    let d = dev();
    let go = zeros::<u32>(&d, 64);
    let f = fault(launch(&d, &sm80(EARLY_EXIT), "early", cfg(1, 64), &[p(go)]));
    assert_eq!(f.check, Check::Synccheck, "{f}");
    assert_eq!(f.kernel, "early");
    assert_eq!(f.line, line_of(&sm80(EARLY_EXIT), "// BARRIER"), "{f}");
    assert!(
        f.detail
            .contains(&format!("line {}", line_of(&sm80(EARLY_EXIT), "// EXIT"))),
        "{f}"
    );
    assert!(
        f.detail.contains("(40,0,0)"),
        "names the first thread that exited: {f}"
    );
}

const TWO_BARRIERS: &str = r#"
.visible .entry two(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r0, %tid.x;
    setp.lt.u32 %p1, %r0, 32;
    @%p1 bra $A;
    bar.sync 2;
    ret;
$A:
    bar.sync 1;
    ret;
}
"#;

#[test]
fn synccheck_reports_threads_waiting_at_different_barriers() {
    let d = dev();
    let f = fault(launch(&d, &sm80(TWO_BARRIERS), "two", cfg(1, 64), &[p(0)]));
    assert_eq!(f.check, Check::Synccheck, "{f}");
    assert!(
        f.detail.contains("deadlock")
            && f.detail.contains("barrier 1")
            && f.detail.contains("barrier 2"),
        "{f}"
    );
}

const SHFL_VS_BAR: &str = r#"
.visible .entry sb(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r0, %laneid;
    setp.lt.u32 %p1, %r0, 16;
    @%p1 bra $A;
    @OTHER@
    ret;
$A:
    shfl.sync.idx.b32 %r1, %r0, 0, 0x1f, 0xffffffff; // SHFL
    ret;
}
"#;

#[test]
fn synccheck_reports_a_shfl_whose_member_lanes_wait_elsewhere() {
    let d = dev();
    // the other half-warp waits at a block barrier the first half never reaches
    let ptx = sm80(&SHFL_VS_BAR.replace("@OTHER@", "bar.sync 0;"));
    let f = fault(launch(&d, &ptx, "sb", cfg(1, 32), &[p(0)]));
    assert_eq!(f.check, Check::Synccheck, "{f}");
    assert_eq!(f.line, line_of(&ptx, "// SHFL"), "{f}");
    assert!(
        f.detail.contains("0xffff0000"),
        "names the missing lanes: {f}"
    );
    // ... or at another warp collective (vote is not the same shfl.sync)
    let ptx = sm80(&SHFL_VS_BAR.replace("@OTHER@", "vote.sync.ballot.b32 %r2, %p1, 0xffffffff;"));
    let f = fault(launch(&d, &ptx, "sb", cfg(1, 32), &[p(0)]));
    assert_eq!(f.check, Check::Synccheck, "{f}");
    // ... or a member lane is predicated off at the shfl: it never executes it
    let ptx = sm80(
        r#"
.visible .entry sp(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r0, %laneid;
    setp.ne.u32 %p1, %r0, 5;
    @%p1 shfl.sync.idx.b32 %r1, %r0, 0, 0x1f, 0xffffffff; // SHFL
    bar.sync 0;
    ret;
}
"#,
    );
    let f = fault(launch(&d, &ptx, "sp", cfg(1, 32), &[p(0)]));
    assert_eq!(f.check, Check::Synccheck, "{f}");
    assert!(f.detail.contains("0x00000020"), "{f}");
    // ... and a lane must be in the mask of the shfl it executes (9.7.9.6: undefined)
    let ptx = sm80(&SHFL_VS_BAR.replace(
        "@OTHER@",
        "shfl.sync.idx.b32 %r1, %r0, 0, 0x1f, 0x0000ffff; // OUTSIDE",
    ));
    let f = fault(launch(&d, &ptx, "sb", cfg(1, 32), &[p(0)]));
    assert_eq!(
        (f.check, f.thread, f.line),
        (Check::Synccheck, [16, 0, 0], line_of(&ptx, "// OUTSIDE")),
        "{f}"
    );
}
