//! 6. Launch validation, as the driver does it (CUDA programming guide, technical
//!    specifications for compute capability 9.0; PTX 11.4 performance-tuning directives)

use super::*;

const TRIVIAL: &str = r#"
.extern .shared .align 16 .b8 dyn[];
.visible .entry plain(.param .u64 out)
{
    ret;
}
.visible .entry stat(.param .u64 out)
{
    .shared .align 4 .b8 buf[1024];
    .reg .b32 %r<2>;
    mov.u32 %r0, 0;
    st.shared.u32 [buf], %r0;
    ret;
}
.visible .entry dynamic(.param .u64 out)
{
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    // write the last word of the dynamic shared memory
    mov.u32 %r0, %dynamic_smem_size;
    sub.u32 %r1, %r0, 4;
    mov.u32 %r2, dyn;
    add.u32 %r3, %r2, %r1;
    st.shared.u32 [%r3], %r0;
    ret;
}
.visible .entry maxn(.param .u64 out)
.maxntid 16, 8, 1
{
    ret;
}
.visible .entry reqn(.param .u64 out)
.reqntid 64
{
    ret;
}
.visible .entry sig(.param .u64 p, .param .u32 n, .param .f32 x, .param .b32 raw)
{
    ret;
}
"#;

fn func(d: &Device, entry: &str) -> lalora_engine::ptxsim::Function {
    let m = d.load_module("trivial", &sm80(TRIVIAL)).unwrap();
    d.function(&m, entry).unwrap()
}

fn grid_block(grid: [u32; 3], block: [u32; 3], shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid,
        block,
        shared_bytes: shared,
    }
}

#[test]
fn launch_refuses_bad_block_and_grid_shapes() {
    let d = dev();
    let f = func(&d, "plain");
    let go = |g: [u32; 3], b: [u32; 3]| d.launch(&f, grid_block(g, b, 0), &[p(0)]);
    go([1, 1, 1], [1024, 1, 1]).unwrap();
    go([1, 1, 1], [8, 8, 16]).unwrap();
    go([1, 65535, 1], [1, 1, 1]).unwrap();
    for (g, b, what) in [
        ([1, 1, 1], [1025, 1, 1], "1025 threads"),
        ([1, 1, 1], [32, 33, 1], "1056 threads"),
        ([1, 1, 1], [1, 1, 65], "block z = 65"),
        ([1, 65536, 1], [1, 1, 1], "grid y = 65536"),
        ([1, 1, 65536], [1, 1, 1], "grid z = 65536"),
        ([0, 1, 1], [1, 1, 1], "at least 1"),
        ([1, 1, 1], [32, 0, 1], "at least 1"),
    ] {
        let m = launch_error(go(g, b));
        assert!(m.contains("plain") && m.contains(what), "{g:?} {b:?}: {m}");
    }
}

#[test]
fn launch_checks_shared_memory_against_48_kb_and_the_opt_in() {
    let d = dev();
    let one = [1, 1, 1];
    let mut f = func(&d, "dynamic");
    d.launch(&f, grid_block(one, one, 48 * 1024), &[p(0)])
        .unwrap();
    let m = launch_error(d.launch(&f, grid_block(one, one, 48 * 1024 + 4), &[p(0)]));
    assert!(m.contains("without opting in"), "{m}");
    // static + dynamic together count
    let s = func(&d, "stat");
    let m = launch_error(d.launch(&s, grid_block(one, one, 47 * 1024 + 16), &[p(0)]));
    assert!(m.contains("1024 static"), "{m}");
    // opting in allows up to 227 KB per block
    f.set_max_dynamic_shared(232_448).unwrap();
    d.launch(&f, grid_block(one, one, 232_448), &[p(0)])
        .unwrap();
    d.launch(&f, grid_block(one, one, 100 * 1024), &[p(0)])
        .unwrap();
    let m = launch_error(d.launch(&f, grid_block(one, one, 232_448 + 4), &[p(0)]));
    assert!(m.contains("exceed"), "{m}");
    assert!(f.set_max_dynamic_shared(232_448 + 1).is_err());
    let mut s = s;
    assert!(
        s.set_max_dynamic_shared(232_448 - 1024 + 1).is_err(),
        "static shared counts against the opt-in"
    );
    // a launch asking more than the opted-in amount
    f.set_max_dynamic_shared(64 * 1024).unwrap();
    let m = launch_error(d.launch(&f, grid_block(one, one, 64 * 1024 + 16), &[p(0)]));
    assert!(m.contains("opted-in 65536"), "{m}");
}

#[test]
fn launch_honours_maxntid_and_reqntid() {
    // 11.4: .maxntid bounds the product of the block dimensions; .reqntid fixes each
    let d = dev();
    let maxn = func(&d, "maxn");
    d.launch(&maxn, grid_block([1, 1, 1], [128, 1, 1], 0), &[p(0)])
        .unwrap();
    d.launch(&maxn, grid_block([1, 1, 1], [4, 4, 8], 0), &[p(0)])
        .unwrap();
    let m = launch_error(d.launch(&maxn, grid_block([1, 1, 1], [129, 1, 1], 0), &[p(0)]));
    assert!(m.contains(".maxntid"), "{m}");
    let reqn = func(&d, "reqn");
    d.launch(&reqn, grid_block([2, 1, 1], [64, 1, 1], 0), &[p(0)])
        .unwrap();
    for b in [[32, 2, 1], [63, 1, 1], [65, 1, 1]] {
        let m = launch_error(d.launch(&reqn, grid_block([1, 1, 1], b, 0), &[p(0)]));
        assert!(m.contains(".reqntid"), "{m}");
    }
}

#[test]
fn launch_checks_the_argument_list_against_the_entry_signature() {
    let d = dev();
    let f = func(&d, "sig");
    let c = cfg(1, 1);
    d.launch(&f, c, &[p(0), Arg::I32(1), Arg::F32(1.0), Arg::I32(7)])
        .unwrap();
    d.launch(&f, c, &[p(0), Arg::I32(1), Arg::F32(1.0), Arg::F32(7.0)])
        .unwrap();
    for (args, what) in [
        (vec![p(0), Arg::I32(1), Arg::F32(1.0)], "3 arguments"),
        (
            vec![p(0), Arg::I32(1), Arg::F32(1.0), Arg::I32(7), Arg::I32(8)],
            "5 arguments",
        ),
        (
            vec![Arg::I32(0), Arg::I32(1), Arg::F32(1.0), Arg::I32(7)],
            "argument 0",
        ),
        (vec![p(0), p(1), Arg::F32(1.0), Arg::I32(7)], "argument 1"),
        (
            vec![p(0), Arg::F32(1.0), Arg::F32(1.0), Arg::I32(7)],
            "argument 1",
        ),
        (
            vec![p(0), Arg::I32(1), Arg::I32(1), Arg::I32(7)],
            "argument 2",
        ),
    ] {
        let m = launch_error(d.launch(&f, c, &args));
        assert!(m.contains("sig") && m.contains(what), "{what}: {m}");
    }
}
