//! PTX-level tests of the GPU simulator (`lalora_engine::ptxsim`): small hand-written
//! kernels, each exercising one feature, run on the simulated device, with every result
//! compared against an expectation computed here independently (plain matrix products,
//! the formulas of the PTX ISA manual, exactly known IEEE results), never against the
//! simulator's own output. Section references are to the PTX ISA manual (9.x) unless
//! said otherwise.

use bytemuck::{Pod, Zeroable};
use lalora_engine::ptxsim::blas::{DType, Gemm, Mat, Trans};
use lalora_engine::ptxsim::{Arg, Check, Checks, Device, Fault, LaunchConfig, SimError};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn dev() -> Device {
    Device::new(Checks::default(), 1 << 28, 2).expect("the simulator starts")
}

fn module(target: &str, body: &str) -> String {
    format!(".version 9.0\n.target {target}\n.address_size 64\n{body}")
}

fn sm80(body: &str) -> String {
    module("sm_80", body)
}

fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes: 0,
    }
}

fn up<T: Pod>(d: &Device, v: &[T]) -> u64 {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let p = d.alloc(bytes.len().max(1), false).expect("alloc");
    d.htod(p, bytes).expect("htod");
    p
}

/// An output buffer of `n` elements, zero-filled (so partial writes can be read back).
fn zeros<T: Pod>(d: &Device, n: usize) -> u64 {
    d.alloc((n * std::mem::size_of::<T>()).max(1), true).expect("alloc")
}

fn down<T: Pod + Zeroable>(d: &Device, p: u64, n: usize) -> Vec<T> {
    let mut v = vec![T::zeroed(); n];
    d.dtoh(bytemuck::cast_slice_mut(&mut v), p).expect("dtoh");
    v
}

fn launch(d: &Device, ptx: &str, entry: &str, c: LaunchConfig, args: &[Arg]) -> Result<(), SimError> {
    let m = d.load_module("test", ptx)?;
    let f = d.function(&m, entry).unwrap_or_else(|| panic!("no entry `{entry}`"));
    d.launch(&f, c, args)
}

fn ok(d: &Device, ptx: &str, entry: &str, c: LaunchConfig, args: &[Arg]) {
    if let Err(e) = launch(d, ptx, entry, c, args) {
        panic!("launch of `{entry}` failed: {e}");
    }
}

fn fault(r: Result<(), SimError>) -> Fault {
    match r {
        Err(SimError::Fault(f)) => *f,
        other => panic!("expected a fault report, got {other:?}"),
    }
}

fn launch_error(r: Result<(), SimError>) -> String {
    match r {
        Err(SimError::Launch(m)) => m,
        other => panic!("expected a launch error, got {other:?}"),
    }
}

/// The 1-based line of `ptx` that contains `marker` (exactly one line must).
fn line_of(ptx: &str, marker: &str) -> u32 {
    let hits: Vec<usize> = ptx
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(marker))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "marker `{marker}` must be on one line");
    hits[0] as u32 + 1
}

fn p(v: u64) -> Arg {
    Arg::U64(v)
}

/// Deterministic pseudo-random numbers (64-bit LCG, top bits).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
    /// An integer in [lo, hi].
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    /// A uniform f64 in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 5) as f64 / (1u64 << 43) as f64
    }
}

// ---------------------------------------------------------------------------------------
// 1. Warp-level matrix instructions (9.7.14/15: mma, ldmatrix, stmatrix; 9.7.9.25 cp.async)
// ---------------------------------------------------------------------------------------

/// Plain row-major product `C + A B` (A is m x k, B is k x n).
fn matmul(a: &[f64], b: &[f64], c: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut d = c.to_vec();
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                d[i * n + j] += a[i * k + p] * b[p * n + j];
            }
        }
    }
    d
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum In {
    Bf16,
    F16,
    Tf32,
}

impl In {
    fn enc(self, x: f64) -> u32 {
        match self {
            In::Bf16 => half::bf16::from_f64(x).to_bits() as u32,
            In::F16 => half::f16::from_f64(x).to_bits() as u32,
            In::Tf32 => (x as f32).to_bits(),
        }
    }
    fn name(self) -> &'static str {
        match self {
            In::Bf16 => "bf16",
            In::F16 => "f16",
            In::Tf32 => "tf32",
        }
    }
}

/// Per-register (row, col) of the low and high half (16-bit inputs) or of the single
/// element (tf32, second entry unused) held by `lane`, written out from the register
/// tables of the manual's "Matrix Fragments for mma.m16n8k{4,8,16}" sections.
fn frag_a(k: usize, ty: In, lane: usize) -> Vec<[(usize, usize); 2]> {
    let (g, t) = (lane / 4, lane % 4);
    match (k, ty) {
        (16, _) => vec![
            [(g, 2 * t), (g, 2 * t + 1)],
            [(g + 8, 2 * t), (g + 8, 2 * t + 1)],
            [(g, 2 * t + 8), (g, 2 * t + 9)],
            [(g + 8, 2 * t + 8), (g + 8, 2 * t + 9)],
        ],
        (8, In::Tf32) => vec![[(g, t); 2], [(g + 8, t); 2], [(g, t + 4); 2], [(g + 8, t + 4); 2]],
        (8, _) => vec![[(g, 2 * t), (g, 2 * t + 1)], [(g + 8, 2 * t), (g + 8, 2 * t + 1)]],
        (4, In::Tf32) => vec![[(g, t); 2], [(g + 8, t); 2]],
        _ => unreachable!(),
    }
}

fn frag_b(k: usize, ty: In, lane: usize) -> Vec<[(usize, usize); 2]> {
    let (g, t) = (lane / 4, lane % 4);
    match (k, ty) {
        (16, _) => vec![[(2 * t, g), (2 * t + 1, g)], [(2 * t + 8, g), (2 * t + 9, g)]],
        (8, In::Tf32) => vec![[(t, g); 2], [(t + 4, g); 2]],
        (8, _) => vec![[(2 * t, g), (2 * t + 1, g)]],
        (4, In::Tf32) => vec![[(t, g); 2]],
        _ => unreachable!(),
    }
}

/// C/D of every m16n8 shape: c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1).
fn frag_c(lane: usize) -> [(usize, usize); 4] {
    let (g, t) = (lane / 4, lane % 4);
    [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]
}

/// A kernel that loads each lane's fragment registers, runs `inst` once and stores D.
fn mma_kernel(inst: &str, na: usize, nb: usize, nc: usize) -> String {
    let list = |r: &str, n: usize| (0..n).map(|i| format!("%{r}{i}")).collect::<Vec<_>>().join(", ");
    let mut s = String::from(
        ".visible .entry mma(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 pd)\n{\n\
         .reg .b32 %a<4>, %b<4>, %c<4>, %d<4>, %lane;\n.reg .b64 %rd<12>;\n\
         mov.u32 %lane, %laneid;\n\
         ld.param.u64 %rd1, [pa];\nld.param.u64 %rd2, [pb];\nld.param.u64 %rd3, [pc];\nld.param.u64 %rd4, [pd];\n",
    );
    for (base, name, n, reg) in [(1, "a", na, 5), (2, "b", nb, 6), (3, "c", nc, 7), (4, "d", nc, 8)] {
        s += &format!("mul.wide.u32 %rd{reg}, %lane, {};\nadd.u64 %rd{reg}, %rd{base}, %rd{reg};\n", 4 * n);
        if name != "d" {
            for i in 0..n {
                s += &format!("ld.global.b32 %{name}{i}, [%rd{reg}+{}];\n", 4 * i);
            }
        }
    }
    s += &format!("{inst} {{{}}}, {{{}}}, {{{}}}, {{{}}};\n", list("d", nc), list("a", na), list("b", nb), list("c", nc));
    for i in 0..nc {
        s += &format!("st.global.b32 [%rd8+{}], %d{i};\n", 4 * i);
    }
    s + "ret;\n}\n"
}

/// Run one mma shape on pseudo-random small values (exact in every input type, so the
/// product is exact) and compare D with the plain product, element by element.
fn check_mma(k: usize, ty: In, f16_acc: bool) {
    let mut rng = Lcg(k as u64 * 31 + ty as u64 * 7 + f16_acc as u64);
    let a: Vec<f64> = (0..16 * k).map(|_| rng.int(-8, 8) as f64 * 0.5).collect();
    let b: Vec<f64> = (0..k * 8).map(|_| rng.int(-6, 6) as f64 * 0.25).collect();
    let c: Vec<f64> = (0..16 * 8).map(|_| rng.int(-16, 16) as f64).collect();
    let want = matmul(&a, &b, &c, 16, k, 8);
    let pack = |regs: Vec<[(usize, usize); 2]>, m: &[f64], cols: usize| -> Vec<u32> {
        regs.iter()
            .map(|[lo, hi]| {
                if ty == In::Tf32 {
                    ty.enc(m[lo.0 * cols + lo.1])
                } else {
                    ty.enc(m[lo.0 * cols + lo.1]) | (ty.enc(m[hi.0 * cols + hi.1]) << 16)
                }
            })
            .collect()
    };
    let (mut fa, mut fb, mut fc) = (Vec::new(), Vec::new(), Vec::new());
    for lane in 0..32 {
        fa.extend(pack(frag_a(k, ty, lane), &a, k));
        fb.extend(pack(frag_b(k, ty, lane), &b, 8));
        let cc = frag_c(lane).map(|(r, col)| c[r * 8 + col]);
        if f16_acc {
            let h = |x: f64| half::f16::from_f64(x).to_bits() as u32;
            fc.extend([h(cc[0]) | (h(cc[1]) << 16), h(cc[2]) | (h(cc[3]) << 16)]);
        } else {
            fc.extend(cc.map(|x| (x as f32).to_bits()));
        }
    }
    let (na, nb, nc) = (fa.len() / 32, fb.len() / 32, fc.len() / 32);
    let acc = if f16_acc { "f16" } else { "f32" };
    let inst = format!("mma.sync.aligned.m16n8k{k}.row.col.{acc}.{t}.{t}.{acc}", t = ty.name());
    let d = dev();
    let (pa, pb, pc) = (up(&d, &fa), up(&d, &fb), up(&d, &fc));
    let pd = zeros::<u32>(&d, 32 * nc);
    ok(&d, &sm80(&mma_kernel(&inst, na, nb, nc)), "mma", cfg(1, 32), &[p(pa), p(pb), p(pc), p(pd)]);
    let out: Vec<u32> = down(&d, pd, 32 * nc);
    let mut seen = [[false; 8]; 16];
    for lane in 0..32 {
        for (i, (r, col)) in frag_c(lane).into_iter().enumerate() {
            let got = if f16_acc {
                half::f16::from_bits((out[lane * 2 + i / 2] >> (16 * (i % 2))) as u16).to_f64()
            } else {
                f32::from_bits(out[lane * 4 + i]) as f64
            };
            assert_eq!(got, want[r * 8 + col], "{inst}: D[{r}][{col}] (lane {lane}, d{i})");
            seen[r][col] = true;
        }
    }
    assert!(seen.iter().flatten().all(|&s| s), "{inst}: D covers the 16x8 tile");
}

#[test]
fn mma_m16n8k16_bf16_and_f16_match_the_plain_product() {
    check_mma(16, In::Bf16, false);
    check_mma(16, In::F16, false);
    check_mma(16, In::F16, true);
}

#[test]
fn mma_m16n8k8_bf16_f16_and_tf32_match_the_plain_product() {
    check_mma(8, In::Bf16, false);
    check_mma(8, In::F16, false);
    check_mma(8, In::F16, true);
    check_mma(8, In::Tf32, false);
}

#[test]
fn mma_m16n8k4_tf32_matches_the_plain_product() {
    check_mma(4, In::Tf32, false);
}

#[test]
fn mma_accumulates_in_f32_not_in_the_input_type() {
    // bf16 inputs whose products sum to a value that needs f32 precision: 1 + 2^-12 is
    // not a bf16 but the f32 accumulator holds it (9.7.14.5.14: accumulation in at least
    // single precision). A = 1 everywhere; B column 0 = (1, 2^-12, 0, ...), C = 0.
    let mut fa = Vec::new();
    let mut fb = Vec::new();
    let one = In::Bf16.enc(1.0);
    for lane in 0..32 {
        fa.extend([one | (one << 16); 4]);
        let regs: Vec<u32> = frag_b(16, In::Bf16, lane)
            .iter()
            .map(|[lo, hi]| {
                let v = |(r, c): (usize, usize)| match (r, c) {
                    (0, 0) => In::Bf16.enc(1.0),
                    (1, 0) => In::Bf16.enc(2f64.powi(-12)),
                    _ => 0,
                };
                v(*lo) | (v(*hi) << 16)
            })
            .collect();
        fb.extend(regs);
    }
    let d = dev();
    let (pa, pb, pc) = (up(&d, &fa), up(&d, &fb), up(&d, &[0u32; 128]));
    let pd = zeros::<u32>(&d, 128);
    let inst = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    ok(&d, &sm80(&mma_kernel(inst, 4, 2, 4)), "mma", cfg(1, 32), &[p(pa), p(pb), p(pc), p(pd)]);
    let out: Vec<f32> = down(&d, pd, 128);
    // lane 0 holds D[0][0] in d0
    assert_eq!(out[0], 1.0 + 2f32.powi(-12));
}

/// Bytes of a shared tile of 32 rows of 8 b16 values (row `s` = slot `s`), distinct values.
fn tile_values() -> Vec<u16> {
    (0..32 * 8).map(|i| (i as u16).wrapping_mul(37).wrapping_add(11)).collect()
}

/// The slot whose row lane `l` addresses: rows need not be contiguous (9.7.14.5.15).
fn slot(l: usize) -> usize {
    (l * 7) % 32
}

const LDMATRIX: &str = r#"
.visible .entry ldm(.param .u64 src, .param .u64 out)
{
    .shared .align 16 .b8 tile[512];
    .reg .b32 %r<16>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [out];
    mul.wide.u32 %rd3, %r0, 16;
    add.u64 %rd4, %rd1, %rd3;
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd4];
    mov.u32 %r5, tile;
    mad.lo.u32 %r6, %r0, 16, %r5;
    st.shared.v4.b32 [%r6], {%r1, %r2, %r3, %r4};
    bar.warp.sync -1;
    mul.lo.u32 %r7, %r0, 7;
    and.b32 %r7, %r7, 31;
    mad.lo.u32 %r8, %r7, 16, %r5;
    mov.u32 %r9, 0;
    mov.u32 %r10, 0;
    mov.u32 %r11, 0;
    mov.u32 %r12, 0;
    @INST@
    add.u64 %rd5, %rd2, %rd3;
    st.global.v4.b32 [%rd5], {%r9, %r10, %r11, %r12};
    ret;
}
"#;

#[test]
fn ldmatrix_x1_x2_x4_with_and_without_trans_follow_the_per_lane_mapping() {
    let vals = tile_values();
    for (num, n) in [("x1", 1usize), ("x2", 2), ("x4", 4)] {
        for trans in [false, true] {
            let regs = ["%r9", "%r10", "%r11", "%r12"][..n].join(", ");
            let inst = format!(
                "ldmatrix.sync.aligned.m8n8.{num}{}.shared.b16 {{{regs}}}, [%r8];",
                if trans { ".trans" } else { "" }
            );
            let ptx = sm80(&LDMATRIX.replace("@INST@", &inst));
            let d = dev();
            let src = up(&d, &vals);
            let out = zeros::<u32>(&d, 128);
            ok(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]);
            let got: Vec<u32> = down(&d, out, 128);
            // M_j[row][col]: the value at col of the row lane 8j + row addresses.
            let m = |j: usize, row: usize, col: usize| vals[slot(8 * j + row) * 8 + col] as u32;
            for l in 0..32 {
                for j in 0..4 {
                    let want = if j >= n {
                        0
                    } else if trans {
                        m(j, 2 * (l % 4), l / 4) | (m(j, 2 * (l % 4) + 1, l / 4) << 16)
                    } else {
                        m(j, l / 4, 2 * (l % 4)) | (m(j, l / 4, 2 * (l % 4) + 1) << 16)
                    };
                    assert_eq!(got[l * 4 + j], want, "{inst} lane {l} register {j}");
                }
            }
        }
    }
}

#[test]
fn ldmatrix_x4_and_x2_trans_feed_mma_a_16x16_by_16x8_product_from_row_major_tiles() {
    // A (16x16) and B (16x8, k-major rows) row-major bf16 tiles in shared memory; lane l
    // addresses A row l%16 at column block l/16, and B row l%16 (9.7.14.5.15, "ldmatrix"
    // with mma).
    let ptx = sm80(
        r#"
.visible .entry ldmma(.param .u64 ga, .param .u64 gb, .param .u64 gd)
{
    .shared .align 16 .b8 sa[512];
    .shared .align 16 .b8 sb[256];
    .reg .pred %p<2>;
    .reg .b32 %r<24>;
    .reg .f32 %f<8>;
    .reg .b64 %rd<10>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [ga];
    ld.param.u64 %rd2, [gb];
    ld.param.u64 %rd3, [gd];
    mul.wide.u32 %rd4, %r0, 16;
    add.u64 %rd5, %rd1, %rd4;
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd5];
    mov.u32 %r5, sa;
    mad.lo.u32 %r6, %r0, 16, %r5;
    st.shared.v4.b32 [%r6], {%r1, %r2, %r3, %r4};
    mov.u32 %r7, sb;
    setp.lt.u32 %p1, %r0, 16;
    @!%p1 bra $SKIP;
    add.u64 %rd6, %rd2, %rd4;
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd6];
    mad.lo.u32 %r8, %r0, 16, %r7;
    st.shared.v4.b32 [%r8], {%r1, %r2, %r3, %r4};
$SKIP:
    bar.warp.sync -1;
    and.b32 %r9, %r0, 15;
    shr.u32 %r10, %r0, 4;
    mad.lo.u32 %r11, %r9, 32, %r5;
    mad.lo.u32 %r11, %r10, 16, %r11;
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r12, %r13, %r14, %r15}, [%r11];
    mad.lo.u32 %r16, %r9, 16, %r7;
    ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%r17, %r18}, [%r16];
    mov.f32 %f0, 0f00000000;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r12, %r13, %r14, %r15}, {%r17, %r18}, {%f0, %f0, %f0, %f0};
    add.u64 %rd7, %rd3, %rd4;
    st.global.v4.f32 [%rd7], {%f1, %f2, %f3, %f4};
    ret;
}
"#,
    );
    let mut rng = Lcg(5);
    let a: Vec<f64> = (0..256).map(|_| rng.int(-10, 10) as f64 * 0.125).collect();
    let b: Vec<f64> = (0..128).map(|_| rng.int(-10, 10) as f64 * 0.5).collect();
    let want = matmul(&a, &b, &[0.0; 128], 16, 16, 8);
    let enc = |v: &[f64]| v.iter().map(|&x| In::Bf16.enc(x) as u16).collect::<Vec<u16>>();
    let d = dev();
    let (ga, gb) = (up(&d, &enc(&a)), up(&d, &enc(&b)));
    let gd = zeros::<f32>(&d, 128);
    ok(&d, &ptx, "ldmma", cfg(1, 32), &[p(ga), p(gb), p(gd)]);
    let out: Vec<f32> = down(&d, gd, 128);
    for lane in 0..32 {
        for (i, (r, c)) in frag_c(lane).into_iter().enumerate() {
            assert_eq!(out[lane * 4 + i] as f64, want[r * 8 + c], "D[{r}][{c}]");
        }
    }
}

const STMATRIX: &str = r#"
.visible .entry stm(.param .u64 out, .param .u64 back)
{
    .shared .align 16 .b8 tile[512];
    .reg .b32 %r<24>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [out];
    ld.param.u64 %rd2, [back];
    mov.u32 %r5, tile;
    // clear the tile (every slot), so that unwritten halves read back as zero
    mad.lo.u32 %r6, %r0, 16, %r5;
    mov.u32 %r1, 0;
    st.shared.v4.b32 [%r6], {%r1, %r1, %r1, %r1};
    bar.warp.sync -1;
    // register j of lane l: low half 3*(8l + 2j) + 1, high half 3*(8l + 2j + 1) + 1
    shl.b32 %r7, %r0, 3;
    mad.lo.u32 %r8, %r7, 3, 1;
    add.u32 %r9, %r8, 3;
    shl.b32 %r9, %r9, 16;
    or.b32 %r10, %r8, %r9;
    add.u32 %r11, %r10, 0x00060006;
    add.u32 %r12, %r11, 0x00060006;
    add.u32 %r13, %r12, 0x00060006;
    mul.lo.u32 %r14, %r0, 7;
    and.b32 %r14, %r14, 31;
    mad.lo.u32 %r15, %r14, 16, %r5;
    @STORE@
    bar.warp.sync -1;
    ld.shared.v4.b32 {%r1, %r2, %r3, %r4}, [%r6];
    mul.wide.u32 %rd3, %r0, 16;
    add.u64 %rd4, %rd1, %rd3;
    st.global.v4.b32 [%rd4], {%r1, %r2, %r3, %r4};
    mov.u32 %r16, 0;
    mov.u32 %r17, 0;
    mov.u32 %r18, 0;
    mov.u32 %r19, 0;
    @LOAD@
    add.u64 %rd5, %rd2, %rd3;
    st.global.v4.b32 [%rd5], {%r16, %r17, %r18, %r19};
    ret;
}
"#;

#[test]
fn stmatrix_is_the_inverse_of_ldmatrix() {
    // 9.7.14.5.16: lane 8j + r gives the address of row r of matrix j; register j of lane
    // l holds M_j[l/4][2(l%4) + h] (transposed: M_j[2(l%4) + h][l/4]).
    let reg = |l: usize, j: usize| -> [u16; 2] {
        let lo = 3 * (8 * l + 2 * j) + 1;
        [lo as u16, (lo + 3) as u16]
    };
    for (num, n) in [("x1", 1usize), ("x2", 2), ("x4", 4)] {
        for trans in [false, true] {
            let t = if trans { ".trans" } else { "" };
            let srcs = ["%r10", "%r11", "%r12", "%r13"][..n].join(", ");
            let dsts = ["%r16", "%r17", "%r18", "%r19"][..n].join(", ");
            let ptx = module(
                "sm_90",
                &STMATRIX
                    .replace("@STORE@", &format!("stmatrix.sync.aligned.m8n8.{num}{t}.shared.b16 [%r15], {{{srcs}}};"))
                    .replace("@LOAD@", &format!("ldmatrix.sync.aligned.m8n8.{num}{t}.shared.b16 {{{dsts}}}, [%r15];")),
            );
            let d = dev();
            let (out, back) = (zeros::<u16>(&d, 256), zeros::<u32>(&d, 128));
            ok(&d, &ptx, "stm", cfg(1, 32), &[p(out), p(back)]);
            let tile: Vec<u16> = down(&d, out, 256);
            let mut want = vec![0u16; 256];
            for l in 0..32 {
                for j in 0..n {
                    for h in 0..2 {
                        let (row, col) = if trans { (2 * (l % 4) + h, l / 4) } else { (l / 4, 2 * (l % 4) + h) };
                        want[slot(8 * j + row) * 8 + col] = reg(l, j)[h];
                    }
                }
            }
            assert_eq!(tile, want, "stmatrix.{num}{t}");
            let back: Vec<u32> = down(&d, back, 128);
            for l in 0..32 {
                for j in 0..n {
                    let [lo, hi] = reg(l, j);
                    assert_eq!(back[l * 4 + j], lo as u32 | ((hi as u32) << 16), "round trip {num}{t} lane {l} reg {j}");
                }
            }
        }
    }
}

/// One warp: each lane copies `size` bytes from `src + lane*16` into shared memory with
/// `@COPY@`, waits with `@WAIT@`, then reads its destination back byte by byte.
const CPASYNC: &str = r#"
.visible .entry cpa(.param .u64 src, .param .u64 out, .param .u32 srcsize)
{
    .shared .align 16 .b8 buf[512];
    .reg .pred %p<2>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<12>;
    mov.u32 %r0, %laneid;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [out];
    ld.param.u32 %r1, [srcsize];
    mul.wide.u32 %rd3, %r0, 16;
    add.u64 %rd4, %rd1, %rd3;
    mov.u32 %r2, buf;
    mad.lo.u32 %r3, %r0, 16, %r2;
    @COPY@
    @WAIT@
    add.u64 %rd5, %rd2, %rd3;
    mov.u32 %r4, 0;
$LOOP:
    add.u32 %r5, %r3, %r4;
    ld.shared.u8 %r6, [%r5];
    cvt.u64.u32 %rd6, %r4;
    add.u64 %rd7, %rd5, %rd6;
    st.global.u8 [%rd7], %r6;
    add.u32 %r4, %r4, 1;
    setp.lt.u32 %p1, %r4, @SIZE@;
    @%p1 bra $LOOP;
    ret;
}
"#;

#[test]
fn cp_async_copies_4_8_16_bytes_and_zero_fills_past_src_size() {
    // 9.7.9.25.3.1: cp-size 4, 8, 16 with .ca, 16 with .cg; src-size n copies n bytes and
    // fills the remaining cp-size - n with zeros.
    let src: Vec<u8> = (0..512).map(|i| (i * 13 + 7) as u8).collect();
    let cases: [(&str, usize, Option<u32>); 7] = [
        ("ca", 4, None),
        ("ca", 8, None),
        ("ca", 16, None),
        ("cg", 16, None),
        ("cg", 16, Some(5)),
        ("ca", 8, Some(0)),
        ("ca", 16, Some(16)),
    ];
    for (op, size, n) in cases {
        let copy = match n {
            None => format!("cp.async.{op}.shared.global [%r3], [%rd4], {size};"),
            Some(_) => format!("cp.async.{op}.shared.global [%r3], [%rd4], {size}, %r1;"),
        };
        let ptx = sm80(
            &CPASYNC
                .replace("@COPY@", &copy)
                .replace("@WAIT@", "cp.async.commit_group;\n    cp.async.wait_group 0;")
                .replace("@SIZE@", &size.to_string()),
        );
        let d = dev();
        let (gs, go) = (up(&d, &src), zeros::<u8>(&d, 512));
        ok(&d, &ptx, "cpa", cfg(1, 32), &[p(gs), p(go), Arg::I32(n.unwrap_or(0) as i32)]);
        let out: Vec<u8> = down(&d, go, 512);
        for l in 0..32 {
            for i in 0..16 {
                let want = if i >= size || i >= n.map_or(size, |n| n as usize) { 0 } else { src[l * 16 + i] };
                assert_eq!(out[l * 16 + i], want, "{copy} lane {l} byte {i}");
            }
        }
    }
}

#[test]
fn cp_async_ignore_src_predicate_writes_zeros() {
    // 9.7.9.25.3.1: with ignore-src true the source is not read and cp-size zeros are
    // written; false copies normally (odd lanes ignore their source here)
    let src: Vec<u8> = (0..512).map(|i| (i * 5 + 3) as u8).collect();
    let copy = "and.b32 %r9, %r0, 1;\n    setp.ne.u32 %p0, %r9, 0;\n    cp.async.ca.shared.global [%r3], [%rd4], 16, %p0;";
    let ptx = sm80(&CPASYNC.replace("@COPY@", copy).replace("@WAIT@", "cp.async.wait_all;").replace("@SIZE@", "16"));
    let d = dev();
    let (gs, go) = (up(&d, &src), zeros::<u8>(&d, 512));
    ok(&d, &ptx, "cpa", cfg(1, 32), &[p(gs), p(go), Arg::I32(0)]);
    let out: Vec<u8> = down(&d, go, 512);
    for l in 0..32 {
        let want: Vec<u8> = if l % 2 == 1 { vec![0; 16] } else { src[l * 16..l * 16 + 16].to_vec() };
        assert_eq!(out[l * 16..l * 16 + 16], want[..], "lane {l}");
    }
}

#[test]
fn cp_async_wait_all_covers_uncommitted_copies_and_wait_group_does_not() {
    // 9.7.9.25.3.3: wait_all = commit_group + wait_group 0; wait_group waits only for
    // committed groups, so an uncommitted copy is still pending: reading its destination
    // is a read of memory the copy has not written (initcheck).
    let src: Vec<u8> = (0..512).map(|i| (i * 3 + 1) as u8).collect();
    let copy = "cp.async.ca.shared.global [%r3], [%rd4], 4;";
    let build = |wait: &str| sm80(&CPASYNC.replace("@COPY@", copy).replace("@WAIT@", wait).replace("@SIZE@", "4"));
    let d = dev();
    let (gs, go) = (up(&d, &src), zeros::<u8>(&d, 512));
    ok(&d, &build("cp.async.wait_all;"), "cpa", cfg(1, 32), &[p(gs), p(go), Arg::I32(0)]);
    let out: Vec<u8> = down(&d, go, 512);
    assert_eq!(out[16..20], src[16..20]);
    let ptx = build("cp.async.wait_group 0;");
    let f = fault(launch(&d, &ptx, "cpa", cfg(1, 32), &[p(gs), p(go), Arg::I32(0)]));
    assert_eq!(f.check, Check::Initcheck, "{f}");
    assert_eq!(f.line, line_of(&ptx, "ld.shared.u8"), "{f}");
}

const CP_PIPE: &str = r#"
.visible .entry pipe(.param .u64 src, .param .u64 out, .param .u32 early)
{
    .shared .align 16 .b8 bufa[128];
    .shared .align 16 .b8 bufb[128];
    .reg .pred %p<2>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<12>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [out];
    ld.param.u32 %r1, [early];
    setp.ne.u32 %p1, %r1, 0;
    mul.wide.u32 %rd3, %r0, 4;
    add.u64 %rd4, %rd1, %rd3;
    mov.u32 %r2, bufa;
    mad.lo.u32 %r3, %r0, 4, %r2;
    mov.u32 %r4, bufb;
    mad.lo.u32 %r5, %r0, 4, %r4;
    cp.async.ca.shared.global [%r3], [%rd4], 4;
    cp.async.commit_group;
    cp.async.ca.shared.global [%r5], [%rd4+128], 4;
    cp.async.commit_group;
    cp.async.wait_group 1;
    ld.shared.u32 %r6, [%r3];
    @%p1 ld.shared.u32 %r7, [%r5]; // EARLY
    cp.async.wait_group 0;
    ld.shared.u32 %r7, [%r5];
    add.u64 %rd5, %rd2, %rd3;
    st.global.u32 [%rd5], %r6;
    st.global.u32 [%rd5+128], %r7;
    ret;
}
"#;

#[test]
fn cp_async_wait_group_n_completes_all_but_the_n_most_recent_groups() {
    let src: Vec<u32> = (0..64).map(|i| i * 1000 + 17).collect();
    let ptx = sm80(CP_PIPE);
    let d = dev();
    let (gs, go) = (up(&d, &src), zeros::<u32>(&d, 64));
    ok(&d, &ptx, "pipe", cfg(1, 32), &[p(gs), p(go), Arg::I32(0)]);
    assert_eq!(down::<u32>(&d, go, 64), src);
    // reading the second group's destination after wait_group 1: still in flight
    let f = fault(launch(&d, &ptx, "pipe", cfg(1, 32), &[p(gs), p(go), Arg::I32(1)]));
    assert_eq!(f.check, Check::Initcheck, "{f}");
    assert_eq!(f.line, line_of(&ptx, "// EARLY"), "{f}");
    assert_eq!(f.thread, [0, 0, 0]);
}

const CP_OTHER: &str = r#"
.visible .entry other(.param .u64 src, .param .u64 out)
{
    .shared .align 16 .b8 buf[16];
    .reg .pred %p<3>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<8>;
    mov.u32 %r0, %tid.x;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [out];
    mov.u32 %r1, buf;
    setp.eq.u32 %p1, %r0, 0;
    setp.eq.u32 %p2, %r0, 33;
    @%p1 cp.async.ca.shared.global [%r1], [%rd1], 4;
    cp.async.wait_all;
    @SYNC@
    @%p2 ld.shared.u32 %r2, [%r1]; // READ
    @%p2 st.global.u32 [%rd2], %r2;
    ret;
}
"#;

#[test]
fn cp_async_data_read_by_another_thread_needs_a_barrier_after_the_wait() {
    // 9.7.9.25.3.3: the copy's writes are visible to the issuing thread after its wait;
    // other threads need a barrier after it (here thread 33 of the next warp reads).
    let d = dev();
    let (gs, go) = (up(&d, &[0xdead_beefu32]), zeros::<u32>(&d, 1));
    ok(&d, &sm80(&CP_OTHER.replace("@SYNC@", "bar.sync 0;")), "other", cfg(1, 64), &[p(gs), p(go)]);
    assert_eq!(down::<u32>(&d, go, 1), [0xdead_beef]);
    let ptx = sm80(&CP_OTHER.replace("@SYNC@", ""));
    let f = fault(launch(&d, &ptx, "other", cfg(1, 64), &[p(gs), p(go)]));
    assert_eq!(f.check, Check::Racecheck, "{f}");
    assert_eq!((f.thread, f.line), ([33, 0, 0], line_of(&ptx, "// READ")), "{f}");
    assert!(f.detail.contains("read-after-write") && f.detail.contains("thread (0,0,0)"), "{f}");
}

// ---------------------------------------------------------------------------------------
// 2. Warp collectives (9.7.9.6 shfl.sync, 9.7.13.9 vote.sync, 9.7.13.11 activemask,
//    9.7.13.2 bar.warp.sync), divergence and reconvergence
// ---------------------------------------------------------------------------------------

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
    ok(&d, &sm80(&SHFL.replace("@MODE@", mode)), "shfl", cfg(1, 32), &[p(out), Arg::I32(b as i32), Arg::I32(c as i32)]);
    down::<u32>(&d, out, 64).chunks(2).map(|x| (x[0], x[1] != 0)).collect()
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
            assert_eq!(idx[l], (v((l / w) * w + 3 % w), true), "idx width {width} lane {l}");
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
        let want = if l + 4 <= 20 { (v(l + 4), true) } else { (v(l), false) };
        assert_eq!(got, want, "down clamp 20 lane {l}");
    }
    // the manual's formula, swept over b and c (incl. bits beyond b[4:0] and c's fields)
    for (mode, b, c) in [("idx", 7u32, 0x0000_1c1fu32), ("up", 33, 0x0800), ("down", 1, 0x0e07), ("idx", 70, 0x1f00)] {
        let got = shfl(mode, b, c);
        let (bval, cval, seg) = ((b & 31) as i64, (c & 31) as i64, ((c >> 8) & 31) as i64);
        for (l, &g) in got.iter().enumerate() {
            let li = l as i64;
            let (max_lane, min_lane) = ((li & seg) | (cval & !seg), li & seg);
            let (j, ok) = match mode {
                "up" => (li - bval, li - bval >= max_lane),
                "down" => (li + bval, li + bval <= max_lane),
                "bfly" => (li ^ bval, (li ^ bval) <= max_lane),
                _ => (min_lane | (bval & !seg), (min_lane | (bval & !seg)) <= max_lane),
            };
            let want = if ok { (v(j as usize), true) } else { (v(l), false) };
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
                assert_eq!(o[5], half, "half-warp ballot: lanes outside the mask give 0");
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
    ok(&d, &sm80(&BARWARP.replace("@SYNC@", "bar.warp.sync 0xffffffff;")), "bw", cfg(1, 32), &[p(go)]);
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
        let src = if l ^ 16 < 16 { (l ^ 16) * 2 } else { (l ^ 16) * 3 };
        assert_eq!((out[2 * l as usize], out[2 * l as usize + 1]), (src, src), "lane {l}");
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
        assert_eq!(out[2 * l as usize + 1], 0xffff & !(1 << 3), "ballot over the live lanes");
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
        assert_eq!(o[0], if warp == 0 { u32::MAX } else { 0xff }, "ballot of thread {t}");
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

// ---------------------------------------------------------------------------------------
// 3. Barriers (9.7.13.1 bar / barrier) and synccheck
// ---------------------------------------------------------------------------------------

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
    for sync in ["bar.sync 0;", "barrier.sync 0;", "barrier.sync.aligned 0;", "bar.cta.sync 0;"] {
        ok(&d, &sm80(&EXCHANGE.replace("@SYNC@", sync)), "exchange", cfg(3, 256), &[p(go)]);
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
    assert!(f.detail.contains(&format!("line {}", line_of(&sm80(EARLY_EXIT), "// EXIT"))), "{f}");
    assert!(f.detail.contains("(40,0,0)"), "names the first thread that exited: {f}");
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
    assert!(f.detail.contains("deadlock") && f.detail.contains("barrier 1") && f.detail.contains("barrier 2"), "{f}");
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
    assert!(f.detail.contains("0xffff0000"), "names the missing lanes: {f}");
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
    let ptx = sm80(&SHFL_VS_BAR.replace("@OTHER@", "shfl.sync.idx.b32 %r1, %r0, 0, 0x1f, 0x0000ffff; // OUTSIDE"));
    let f = fault(launch(&d, &ptx, "sb", cfg(1, 32), &[p(0)]));
    assert_eq!((f.check, f.thread, f.line), (Check::Synccheck, [16, 0, 0], line_of(&ptx, "// OUTSIDE")), "{f}");
}

// ---------------------------------------------------------------------------------------
// 4. Memory and the checks (memcheck, racecheck, initcheck); state spaces
// ---------------------------------------------------------------------------------------

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
    assert_eq!((f.kernel.as_str(), f.block, f.thread), ("copy", [1, 0, 0], [36, 0, 0]), "{f}");
    assert_eq!(f.line, line_of(&ptx, "// READ"));
    assert!(f.text.starts_with("ld.global.f32"), "{f}");
    assert!(f.detail.contains("0 bytes past the end of allocation"), "{f}");
    assert!(f.detail.contains(&format!("(400 bytes at {input:#x})")), "names the allocation: {f}");
    let shown = f.to_string();
    assert!(shown.starts_with(&format!("memcheck: kernel `copy` block (1,0,0) thread (36,0,0) PTX line {}", f.line)), "{shown}");
}

#[test]
fn memcheck_reports_a_write_past_the_end() {
    let d = dev();
    let ptx = sm80(COPY);
    let input = up(&d, &[2.0f32; 128]);
    let out = zeros::<f32>(&d, 100);
    let f = fault(launch(&d, &ptx, "copy", cfg(1, 128), &[p(input), p(out)]));
    assert_eq!(f.check, Check::Memcheck, "{f}");
    assert_eq!((f.thread, f.line), ([100, 0, 0], line_of(&ptx, "// WRITE")), "{f}");
    assert!(f.detail.contains("global write") && f.detail.contains(&format!("(400 bytes at {out:#x})")), "{f}");
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
    assert!(f.detail.contains("use after free") && f.detail.contains(&format!("{input:#x}")), "{f}");
    // a pointer near the top of the address space (e.g. a null pointer minus an offset)
    let f = fault(launch(&d, &ptx, "copy", cfg(1, 64), &[p(u64::MAX - 3), p(out)]));
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
        assert_eq!((f.check, f.line), (Check::Memcheck, line_of(&ptx, "// LOAD")), "{f}");
        assert!(f.detail.contains(&format!("misaligned {size}-byte")), "{f}");
    }
    let ptx = sm80(&MISALIGNED.replace("@LOAD@", "ld.global.v4.f32 {%f1, %f2, %f3, %f0}, [%rd1+16];"));
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
    assert_eq!((f.check, f.thread, f.line), (Check::Memcheck, [32, 0, 0], line_of(&ptx, "// STORE")), "{f}");
    assert!(f.detail.contains("out-of-bounds shared write") && f.detail.contains("128 bytes"), "{f}");
    // below the start of shared memory
    let f = fault(launch(&d, &ptx, "soob", cfg(1, 32), &[Arg::I32(1)]));
    assert_eq!((f.check, f.line), (Check::Memcheck, line_of(&ptx, "// NEGATIVE")), "{f}");
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
        assert_eq!((got[2 * t as usize], got[2 * t as usize + 1]), (want, want), "thread {t}");
    }
    let f = fault(launch(&d, &ptx, "loc", cfg(1, 64), &[p(out), Arg::I32(16)]));
    assert_eq!((f.check, f.thread, f.line), (Check::Memcheck, [0, 0, 0], line_of(&ptx, "// READ")), "{f}");
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
        ("@%p1 st.shared.u32 [%r3], %r0;\n    @!%p1 ld.shared.u32 %r4, [%r3]; // HAZARD", "read-after-write"),
        // write-after-read: after a barrier, warp 0 reads and warp 1 overwrites
        (
            "@%p1 st.shared.u32 [%r3], %r0;\n    bar.sync 0;\n    @%p1 ld.shared.u32 %r4, [%r3];\n    @!%p1 st.shared.u32 [%r3], %r0; // HAZARD",
            "write-after-read",
        ),
        // write-after-write
        ("@%p1 st.shared.u32 [%r3], %r0;\n    @!%p1 st.shared.u32 [%r3], %r0; // HAZARD", "write-after-write"),
    ];
    let d = dev();
    for (body, kind) in cases {
        let ptx = sm80(&RACE.replace("@BODY@", body));
        let f = fault(launch(&d, &ptx, "race", cfg(1, 64), &[p(0)]));
        assert_eq!((f.check, f.thread, f.line), (Check::Racecheck, [32, 0, 0], line_of(&ptx, "// HAZARD")), "{f}");
        assert!(f.detail.contains(kind) && f.detail.contains("thread (0,0,0)") && f.detail.contains("`s`+0"), "{f}");
    }
    // the same accesses with a barrier between them
    let body = "@%p1 st.shared.u32 [%r3], %r0;\n    bar.sync 0;\n    @!%p1 ld.shared.u32 %r4, [%r3];\n    bar.sync 0;\n    @!%p1 st.shared.u32 [%r3], %r0;";
    ok(&d, &sm80(&RACE.replace("@BODY@", body)), "race", cfg(1, 64), &[p(0)]);
}

#[test]
fn racecheck_orders_a_warps_broadcast_read_before_its_bar_warp_sync() {
    // every lane of warp 0 reads s[0]; after bar.warp.sync lane 0 overwrites it: ordered
    // (9.7.13.2); without the bar.warp.sync it is a write-after-read hazard
    let body = "st.shared.u32 [%r3], %r0;\n    bar.warp.sync -1;\n    ld.shared.u32 %r4, [%r2];\n    @SYNC@\n    setp.eq.u32 %p2, %r0, 0;\n    @%p2 st.shared.u32 [%r2], %r4; // HAZARD";
    let d = dev();
    ok(&d, &sm80(&RACE.replace("@BODY@", &body.replace("@SYNC@", "bar.warp.sync -1;"))), "race", cfg(1, 32), &[p(0)]);
    let ptx = sm80(&RACE.replace("@BODY@", &body.replace("@SYNC@", "")));
    let f = fault(launch(&d, &ptx, "race", cfg(1, 32), &[p(0)]));
    assert_eq!((f.check, f.line), (Check::Racecheck, line_of(&ptx, "// HAZARD")), "{f}");
    assert!(f.detail.contains("write-after-read"), "{f}");
}

#[test]
fn racecheck_tracks_bytes_not_words() {
    // threads writing neighbouring 16-bit elements of one word do not race (bf16 tiles);
    // reading a neighbour's element without a barrier does
    let body = "mov.u32 %r5, %tid.x;\n    mad.lo.u32 %r6, %r5, 2, %r2;\n    st.shared.b16 [%r6], %r5;\n    ld.shared.b16 %r7, [%r6];\n    @READ@";
    let d = dev();
    ok(&d, &sm80(&RACE.replace("@BODY@", &body.replace("@READ@", ""))), "race", cfg(1, 64), &[p(0)]);
    let ptx = sm80(&RACE.replace("@BODY@", &body.replace("@READ@", "xor.b32 %r8, %r6, 2;\n    ld.shared.b16 %r9, [%r8]; // HAZARD")));
    let f = fault(launch(&d, &ptx, "race", cfg(1, 64), &[p(0)]));
    assert_eq!((f.check, f.thread, f.line), (Check::Racecheck, [0, 0, 0], line_of(&ptx, "// HAZARD")), "{f}");
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
    assert_eq!((f.check, f.thread, f.line), (Check::Initcheck, [32, 0, 0], line_of(&ptx, "// READ")), "{f}");
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
    assert_eq!((f.check, f.line), (Check::Initcheck, line_of(&ptx, "// HAZARD")), "{f}");
    assert!(f.detail.contains("never-written shared memory: `s`+4"), "{f}");
    // with initcheck off, the same kernels run
    let quiet = Device::new(Checks { racecheck: true, initcheck: false }, 1 << 20, 1).unwrap();
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
    assert_eq!((o[10], o[11]), (u64::MAX, 0x0123_4567_89ab_cdef), "ld.v2.u64");
    let v4: Vec<u32> = bytemuck::cast_slice(&o[12..14]).to_vec();
    assert_eq!(v4, [7, 0xdead_beef, 3, 0x8000_0000], "ld.v4.u32 / st.v4.u32");
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
    let args = [p(go), Arg::F32(-2.75), Arg::I32(-7), p(0x0123_4567_89ab_cdef), Arg::F32(0.5)];
    ok(&d, &sm80(PARAMS), "params", cfg(1, 1), &args);
    let o: Vec<u32> = down(&d, go, 6);
    assert_eq!(o[..3], [(-2.75f32).to_bits(), -7i32 as u32, 0.5f32.to_bits()]);
    assert_eq!((o[4], o[5]), (0x89ab_cdef, 0x0123_4567));
    // a .b32 parameter takes an integer as well
    ok(&d, &sm80(PARAMS), "params", cfg(1, 1), &[p(go), Arg::F32(1.0), Arg::I32(3), p(9), Arg::I32(42)]);
    assert_eq!(down::<u32>(&d, go, 3)[2], 42);
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
    let (count, dump) = (d.function(&m, "count").unwrap(), d.function(&m, "dump").unwrap());
    d.launch(&count, cfg(3, 100), &[]).unwrap();
    let go = zeros::<u32>(&d, 16);
    d.launch(&dump, cfg(1, 1), &[p(go)]).unwrap();
    let o: Vec<u32> = down(&d, go, 16);
    assert_eq!(o[..4], [1, 2, 3, u32::MAX], ".global .u32 array");
    assert_eq!(o[4..6], [-5i32 as u32, 7], "negative initialisers");
    assert_eq!(o[6..9], [1.5f32.to_bits(), 2.0f32.to_bits(), 2.5f32.to_bits()], ".const .f32 (hex and decimal literals)");
    assert_eq!(o[9..11], [0x3c00, 0xc000], ".const .b16");
    assert_eq!(o[11], 300, "a zero-initialised .global counter keeps its value between launches");
    let f64s: Vec<f64> = bytemuck::cast_slice(&o[12..16]).to_vec();
    assert_eq!(f64s, [1.5, 0.25], ".const .f64");
}

// ---------------------------------------------------------------------------------------
// 5. Atomics (9.7.13.5 atom, 9.7.13.6 red)
// ---------------------------------------------------------------------------------------

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
    ok(&d, &sm80(ATOMICS), "atoms", cfg(blocks, threads), &[p(g), p(olds)]);
    let v: Vec<u32> = down(&d, g, slot::WORDS);
    let o: Vec<u32> = down(&d, olds, 4 * n);
    let n32 = n as u32;
    assert_eq!(v[slot::ADD], n32);
    assert_eq!(f32::from_bits(v[slot::FADD]), n as f32);
    assert_eq!(v[slot::ADD64] as u64 | (v[slot::ADD64 + 1] as u64) << 32, n as u64 * 0x1_0000_0001);
    assert_eq!(v[slot::CAS], n32);
    // inc(r, 9) = r >= 9 ? 0 : r + 1; dec(r, 9) = r == 0 || r > 9 ? 9 : r - 1
    assert_eq!(v[slot::INC], n32 % 10);
    assert_eq!(v[slot::DEC], (10 - n32 % 10) % 10);
    let scrambled: Vec<i32> = (0..n as u32).map(|i| ((i * 7919) % 10007) as i32 - 5000).collect();
    assert_eq!(v[slot::MIN] as i32, *scrambled.iter().min().unwrap());
    assert_eq!(v[slot::MAX] as i32, *scrambled.iter().max().unwrap());
    assert_eq!(v[slot::UMAX], scrambled.iter().map(|&x| x as u32).max().unwrap(), "max.u32 compares unsigned");
    assert_eq!((v[slot::OR], v[slot::XOR], v[slot::AND]), (u32::MAX, 0, 0));
    // every atom returned a distinct old value: add's are 0..n, exch's with the final value
    // are 0..=n, inc's lie in [0, 9] with each value n/10 times (rounded)
    let mut adds: Vec<u32> = (0..n).map(|i| o[4 * i]).collect();
    adds.sort_unstable();
    assert_eq!(adds, (0..n32).collect::<Vec<_>>());
    let mut chain: Vec<u32> = (0..n).map(|i| o[4 * i + 2]).chain([v[slot::EXCH]]).collect();
    chain.sort_unstable();
    assert_eq!(chain, (0..=n32).collect::<Vec<_>>());
    let mut hist = [0usize; 10];
    for i in 0..n {
        hist[o[4 * i + 1] as usize] += 1;
    }
    assert!(hist.iter().all(|&h| h == n / 10 || h == n / 10 + 1), "{hist:?}");
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
    let max = (0..256i32).map(|t| if t % 3 == 0 { 100 - t } else { t - 100 }).max().unwrap();
    for b in 0..4 {
        let r = &o[4 * b..4 * b + 4];
        assert_eq!(r[0], 3 * 256, "add.u32 block {b}");
        assert_eq!(f32::from_bits(r[1]), 128.0, "add.f32");
        assert_eq!(r[2] as i32, max, "max.s32");
        assert_eq!(r[3], 2 * 256, "cas loop");
    }
    // without the initialising store, the first atomic reads never-written shared memory
    let f = fault(launch(&d, &ptx, "satoms", cfg(1, 32), &[p(out), Arg::I32(0)]));
    assert_eq!((f.check, f.line), (Check::Initcheck, line_of(&ptx, "// FIRST")), "{f}");
}

#[test]
fn float_atomics_other_than_add_are_refused_at_load() {
    // 9.7.13.5: min/max/inc/dec are integer operations; the float operation is .add
    let d = dev();
    let ptx = sm80(".visible .entry k(.param .u64 g)\n{\n.reg .f32 %f<2>;\n.reg .b64 %rd<2>;\nld.param.u64 %rd1, [g];\natom.global.min.f32 %f1, [%rd1], %f0;\nret;\n}\n");
    match d.load_module("m", &ptx) {
        Err(SimError::Ptx(line, m)) => assert!(line == 9 && m.contains("only .add"), "{line}: {m}"),
        other => panic!("expected a PTX error, got {:?}", other.map(|_| ())),
    }
}

// ---------------------------------------------------------------------------------------
// 6. Launch validation, as the driver does it (CUDA programming guide, technical
//    specifications for compute capability 9.0; PTX 11.4 performance-tuning directives)
// ---------------------------------------------------------------------------------------

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
    LaunchConfig { grid, block, shared_bytes: shared }
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
    d.launch(&f, grid_block(one, one, 48 * 1024), &[p(0)]).unwrap();
    let m = launch_error(d.launch(&f, grid_block(one, one, 48 * 1024 + 4), &[p(0)]));
    assert!(m.contains("without opting in"), "{m}");
    // static + dynamic together count
    let s = func(&d, "stat");
    let m = launch_error(d.launch(&s, grid_block(one, one, 47 * 1024 + 16), &[p(0)]));
    assert!(m.contains("1024 static"), "{m}");
    // opting in allows up to 227 KB per block
    f.set_max_dynamic_shared(232_448).unwrap();
    d.launch(&f, grid_block(one, one, 232_448), &[p(0)]).unwrap();
    d.launch(&f, grid_block(one, one, 100 * 1024), &[p(0)]).unwrap();
    let m = launch_error(d.launch(&f, grid_block(one, one, 232_448 + 4), &[p(0)]));
    assert!(m.contains("exceed"), "{m}");
    assert!(f.set_max_dynamic_shared(232_448 + 1).is_err());
    let mut s = s;
    assert!(s.set_max_dynamic_shared(232_448 - 1024 + 1).is_err(), "static shared counts against the opt-in");
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
    d.launch(&maxn, grid_block([1, 1, 1], [128, 1, 1], 0), &[p(0)]).unwrap();
    d.launch(&maxn, grid_block([1, 1, 1], [4, 4, 8], 0), &[p(0)]).unwrap();
    let m = launch_error(d.launch(&maxn, grid_block([1, 1, 1], [129, 1, 1], 0), &[p(0)]));
    assert!(m.contains(".maxntid"), "{m}");
    let reqn = func(&d, "reqn");
    d.launch(&reqn, grid_block([2, 1, 1], [64, 1, 1], 0), &[p(0)]).unwrap();
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
    d.launch(&f, c, &[p(0), Arg::I32(1), Arg::F32(1.0), Arg::I32(7)]).unwrap();
    d.launch(&f, c, &[p(0), Arg::I32(1), Arg::F32(1.0), Arg::F32(7.0)]).unwrap();
    for (args, what) in [
        (vec![p(0), Arg::I32(1), Arg::F32(1.0)], "3 arguments"),
        (vec![p(0), Arg::I32(1), Arg::F32(1.0), Arg::I32(7), Arg::I32(8)], "5 arguments"),
        (vec![Arg::I32(0), Arg::I32(1), Arg::F32(1.0), Arg::I32(7)], "argument 0"),
        (vec![p(0), p(1), Arg::F32(1.0), Arg::I32(7)], "argument 1"),
        (vec![p(0), Arg::F32(1.0), Arg::F32(1.0), Arg::I32(7)], "argument 1"),
        (vec![p(0), Arg::I32(1), Arg::I32(1), Arg::I32(7)], "argument 2"),
    ] {
        let m = launch_error(d.launch(&f, c, &args));
        assert!(m.contains("sig") && m.contains(what), "{what}: {m}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Arithmetic semantics against known values (9.7.1-9.7.4, 9.7.8, 9.7.9.21 cvt)
// ---------------------------------------------------------------------------------------

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
        body = body.replace("st.global.v2.u64 [%a3], {%y0, %y1};", "st.global.u64 [%a3], %y0;");
    }
    let d = dev();
    let flat: Vec<u64> = cases.iter().flatten().copied().collect();
    let gi = up(&d, &flat);
    let go = zeros::<u64>(&d, 2 * cases.len());
    let n = cases.len() as u32;
    let ptx = sm80(&body);
    if let Err(e) = launch(&d, &ptx, "op", cfg(n.div_ceil(128), 128), &[p(gi), p(go), Arg::I32(n as i32)]) {
        panic!("`{inst}`: {e}");
    }
    let out: Vec<u64> = down(&d, go, 2 * cases.len());
    out.chunks(2).map(|c| c[..dsts.len()].to_vec()).collect()
}

/// One 32-bit result per case for `op.type %d0, %s0[, %s1[, %s2]]`.
fn op32(inst: &str, nsrc: usize, cases: &[[u32; 3]]) -> Vec<u32> {
    let srcs = vec![R::B32; nsrc];
    let ops = (0..nsrc).map(|i| format!("%s{i}")).collect::<Vec<_>>().join(", ");
    let c: Vec<[u64; 3]> = cases.iter().map(|c| c.map(|x| x as u64)).collect();
    run_op(&format!("{inst} %d0, {ops}"), &[R::B32], &srcs, &c).iter().map(|r| r[0] as u32).collect()
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
    assert_eq!(x.cmp(lo as f64), Less, "{what}: {mode} result {r:e} is not adjacent to the exact value");
    assert_eq!(x.cmp(hi as f64), Greater, "{what}: {mode} result {r:e} is not adjacent to the exact value");
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
    assert_eq!(r.to_bits(), want.to_bits(), "{what}: .{mode} gives {r:e}, want {want:e}");
}

fn random_f32(rng: &mut Lcg, emin: i32, emax: i32) -> f32 {
    let m = 1.0 + rng.unit();
    let e = rng.int(emin as i64, emax as i64) as i32;
    let s = if rng.next().is_multiple_of(2) { 1.0 } else { -1.0 };
    (s * m * 2f64.powi(e)) as f32
}

#[test]
fn f32_add_mul_fma_div_sqrt_round_in_every_mode() {
    // 9.7.3: with .rn .rz .rm .rp the result is the IEEE rounding of the exact value
    let mut rng = Lcg(11);
    let cases: Vec<[u32; 3]> = (0..256)
        .map(|_| [0; 3].map(|_| f(random_f32(&mut rng, -20, 20))))
        .chain([[f(1.0), f(2f32.powi(-30)), 0], [f(1.0), f(3.0), f(-1.0 / 3.0)], [f(0.1), f(0.2), f(0.3)]])
        .collect();
    let roots: Vec<[u32; 3]> = cases.iter().map(|c| [c[0] & 0x7fff_ffff, 0, 0]).chain([[f(2.0), 0, 0]]).collect();
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
            check_rounding(mode, fx(mul[i]), Exact(a * b, 0.0), &format!("{a:e} * {b:e}"));
            check_rounding(mode, fx(fma[i]), two_sum(a * b, cc), &format!("fma({a:e}, {b:e}, {cc:e})"));
            // q against a / b: the sign of q b - a (exact in f64), times the sign of b
            let side = |q: f32| {
                let t = (q as f64 * b).partial_cmp(&a).unwrap();
                if b < 0.0 { t.reverse() } else { t }
            };
            check_bracket(mode, fx(div[i]), side, (a / b) as f32, &format!("{a:e} / {b:e}"));
        }
        for (i, c) in roots.iter().enumerate() {
            let a = fx(c[0]) as f64;
            let side = |r: f32| (r as f64 * r as f64).partial_cmp(&a).unwrap();
            check_bracket(mode, fx(sqrt[i]), side, a.sqrt() as f32, &format!("sqrt({a:e})"));
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
fn check_bracket(mode: &str, r: f32, side: impl Fn(f32) -> std::cmp::Ordering, nearest: f32, what: &str) {
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
    assert_eq!((side(lo), side(hi)), (Less, Greater), "{what}: .{mode} result {r:e} is not adjacent to the exact value");
    let want = match mode {
        "rm" => lo,
        "rp" => hi,
        _ if hi <= 0.0 => hi,
        _ => lo,
    };
    assert_eq!(r.to_bits(), want.to_bits(), "{what}: .{mode} gives {r:e}, want {want:e}");
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
        ("mul.rn.f32", [f(1e-20), f(1e-20), 0], f(1e-20f32 * 1e-20f32)),
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
        let n = if inst.starts_with("fma") { 3 } else if inst.starts_with("add") || inst.starts_with("mul") || inst.starts_with("min") { 2 } else { 1 };
        assert_eq!(op32(inst, n, &[c])[0], want, "{inst} {c:x?}");
    }
    let ordered = run_op("setp.lt.ftz.f32 %d0, %s0, %s1", &[R::Pred], &[R::B32, R::B32], &[[f(sub) as u64, 0, 0]]);
    let plain = run_op("setp.lt.f32 %d0, %s1, %s0", &[R::Pred], &[R::B32, R::B32], &[[f(sub) as u64, 0, 0]]);
    assert_eq!((ordered[0][0], plain[0][0]), (0, 1), "setp.ftz compares flushed inputs");
}

#[test]
fn sat_clamps_to_zero_one_and_sends_nan_to_zero() {
    let cases = [
        ("add.sat.f32", 2, [f(0.7), f(0.6), 0], f(1.0)),
        ("add.sat.f32", 2, [f(-0.5), f(0.1), 0], f(0.0)),
        ("add.sat.f32", 2, [f(0.25), f(0.5), 0], f(0.75)),
        ("add.sat.f32", 2, [f(f32::INFINITY), f(f32::NEG_INFINITY), 0], f(0.0)),
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
    assert_eq!((min[5], max[5], min[6], max[6]), (f(-3.0), f(1.0), f(f32::NEG_INFINITY), f(1.0)));
    assert!(min_nan[..3].iter().chain(&max_nan[..3]).all(|&x| fx(x).is_nan()), "min.NaN/max.NaN");
    assert_eq!((min_nan[5], max_nan[5]), (f(-3.0), f(1.0)));
    // f64 follows the same rules
    let d = |x: f64| x.to_bits();
    let r = run_op("min.f64 %d0, %s0, %s1", &[R::B64], &[R::B64, R::B64], &[[d(f64::NAN), d(-2.5), 0], [d(0.0), d(-0.0), 0]]);
    assert_eq!((r[0][0], r[1][0]), (d(-2.5), d(-0.0)));
}

#[test]
fn setp_ordered_unordered_and_combined_predicates() {
    // 9.7.6.1: ordered comparisons are false with a NaN operand (ne too); the unordered
    // ones are true; num/nan test for NaN
    let nan = f32::NAN;
    let vals = [(1.0f32, 2.0f32), (2.0, 2.0), (3.0, 2.0), (nan, 2.0), (2.0, nan), (-0.0, 0.0)];
    for cmp in ["eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan"] {
        let cases: Vec<[u64; 3]> = vals.iter().map(|&(a, b)| [f(a) as u64, f(b) as u64, 0]).collect();
        let got = run_op(&format!("setp.{cmp}.f32 %d0|%d1, %s0, %s1"), &[R::Pred, R::Pred], &[R::B32, R::B32], &cases);
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
            assert_eq!((g[0], g[1]), (want as u64, !want as u64), "setp.{cmp} {a} {b}");
        }
    }
    // p = (a > b) AND !c, q = !(a > b) AND !c
    let cases: Vec<[u64; 3]> = [(3.0f32, 2.0f32, 0u64), (3.0, 2.0, 1), (1.0, 2.0, 0), (1.0, 2.0, 1)]
        .iter()
        .map(|&(a, b, c)| [f(a) as u64, f(b) as u64, c])
        .collect();
    let got = run_op("setp.gt.and.f32 %d0|%d1, %s0, %s1, !%s2", &[R::Pred, R::Pred], &[R::B32, R::B32, R::Pred], &cases);
    assert_eq!(got, [vec![1, 0], vec![0, 0], vec![0, 1], vec![0, 0]]);
    // integer comparisons: signed, unsigned aliases
    let got = run_op("setp.lt.s32 %d0|%d1, %s0, %s1", &[R::Pred, R::Pred], &[R::B32, R::B32], &[[0xffff_ffff, 0, 0]]);
    assert_eq!(got[0], [1, 0]);
    let got = run_op("setp.lo.u32 %d0|%d1, %s0, %s1", &[R::Pred, R::Pred], &[R::B32, R::B32], &[[0xffff_ffff, 0, 0]]);
    assert_eq!(got[0], [0, 1]);
}

#[test]
fn testp_classes_and_copysign_operand_order() {
    // 9.7.3.1 testp: zeros count as normal
    let vals = [0.0f32, -0.0, 1.5, 1e-40, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
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
        let got: Vec<u64> = run_op(&format!("testp.{kind}.f32 %d0, %s0"), &[R::Pred], &[R::B32], &cases).iter().map(|r| r[0]).collect();
        assert_eq!(got, w, "testp.{kind}");
    }
    // 9.7.3.2: copysign d, a, b copies the sign of a onto b
    let got = op32("copysign.f32", 2, &[[f(-1.0), f(2.0), 0], [f(1.0), f(-2.0), 0], [f(-0.0), f(f32::INFINITY), 0]]);
    assert_eq!(got, [f(-2.0), f(2.0), f(f32::NEG_INFINITY)]);
    let d = |x: f64| x.to_bits();
    let got = run_op("copysign.f64 %d0, %s0, %s1", &[R::B64], &[R::B64, R::B64], &[[d(-3.0), d(0.5), 0]]);
    assert_eq!(got[0][0], d(-0.5));
}

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
    let r = run_op("cvt.rzi.u8.f32 %d0, %s0", &[R::B16], &[R::B32], &[[f(300.0) as u64, 0, 0], [f(-3.0) as u64, 0, 0]]);
    assert_eq!((r[0][0], r[1][0]), (255, 0));
    let r = run_op("cvt.rzi.s16.f32 %d0, %s0", &[R::B16], &[R::B32], &[[f(-40000.0) as u64, 0, 0]]);
    assert_eq!(r[0][0], 0x8000);
    // 64-bit destinations and f64 sources give the top bit for NaN
    let r = run_op("cvt.rzi.s64.f32 %d0, %s0", &[R::B64], &[R::B32], &[[nan as u64, 0, 0]]);
    assert_eq!(r[0][0], 1 << 63);
    let r = run_op("cvt.rzi.s32.f64 %d0, %s0", &[R::B32], &[R::B64], &[[f64::NAN.to_bits(), 0, 0]]);
    assert_eq!(r[0][0], 0x8000_0000);
    let r = run_op("cvt.rzi.u64.f64 %d0, %s0", &[R::B64], &[R::B64], &[[1e30f64.to_bits(), 0, 0]]);
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
    let r = run_op("cvt.rn.f32.u64 %d0, %s0", &[R::B32], &[R::B64], &[[u64::MAX, 0, 0]]);
    assert_eq!(fx(r[0][0] as u32), 2f32.powi(64));
    let r = run_op("cvt.rz.f32.u64 %d0, %s0", &[R::B32], &[R::B64], &[[u64::MAX, 0, 0]]);
    assert_eq!(fx(r[0][0] as u32), 2f32.powi(64) - 2f32.powi(40));
    let r = run_op("cvt.rn.f64.s64 %d0, %s0", &[R::B64], &[R::B64], &[[(1u64 << 53) + 1, 0, 0]]);
    assert_eq!(f64::from_bits(r[0][0]), 2f64.powi(53));
    let r = run_op("cvt.rp.f64.s64 %d0, %s0", &[R::B64], &[R::B64], &[[(1u64 << 53) + 1, 0, 0]]);
    assert_eq!(f64::from_bits(r[0][0]), 2f64.powi(53) + 2.0);
    // int -> int: .sat clamps, otherwise truncate / extend by the source type
    let r = run_op("cvt.sat.s8.s32 %d0, %s0", &[R::B32], &[R::B32], &[[300, 0, 0], [(-300i32) as u32 as u64, 0, 0]]);
    assert_eq!((r[0][0], r[1][0]), (127, 0xffff_ff80), "s8 results sign-extend into a 32-bit register");
    let r = run_op("cvt.u16.u32 %d0, %s0", &[R::B16], &[R::B32], &[[0x12345, 0, 0]]);
    assert_eq!(r[0][0], 0x2345);
    let r = run_op("cvt.s64.s16 %d0, %s0", &[R::B64], &[R::B16], &[[0x8001, 0, 0]]);
    assert_eq!(r[0][0], (-32767i64) as u64);
}

#[test]
fn cvt_to_bf16_f16_tf32_round_and_pack() {
    let h16 = |inst: &str, x: f32| run_op(&format!("{inst} %d0, %s0"), &[R::B16], &[R::B32], &[[f(x) as u64, 0, 0]])[0][0] as u16;
    let bf = |x: f32| half::bf16::from_f32(x).to_bits();
    let hf = |x: f32| half::f16::from_f32(x).to_bits();
    // bf16: 1 + 2^-8 is half an ulp above 1 (ties to even: 1); 1 + 3 2^-8 ties up to 1 + 2^-6
    assert_eq!(h16("cvt.rn.bf16.f32", 1.0 + 2f32.powi(-8)), bf(1.0));
    assert_eq!(h16("cvt.rn.bf16.f32", 1.0 + 3.0 * 2f32.powi(-8)), bf(1.0 + 2f32.powi(-6)));
    assert_eq!(h16("cvt.rz.bf16.f32", 1.99), bf(1.984375));
    assert_eq!(h16("cvt.rp.bf16.f32", 1.0 + 2f32.powi(-20)), bf(1.0 + 2f32.powi(-7)));
    assert_eq!(h16("cvt.rm.bf16.f32", -1.0 - 2f32.powi(-20)), bf(-1.0 - 2f32.powi(-7)));
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
    assert_eq!(h16("cvt.rn.f16.f32", 2f32.powi(-25)), 0, "a tie between 0 and the least subnormal");
    assert_eq!(h16("cvt.rp.f16.f32", 2f32.powi(-25)), 1);
    // back to f32 exactly
    let r = run_op("cvt.f32.f16 %d0, %s0", &[R::B32], &[R::B16], &[[0x3555, 0, 0]]);
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
        assert!((r as f64 - x as f64).abs() <= (x.abs() as f64) * 2f64.powi(-11), "tf32 of {x:e}: {r:e}");
    }
    // packed: the first source goes to the upper half
    let r = op32("cvt.rn.bf16x2.f32", 2, &[[f(1.0), f(-2.0), 0]]);
    assert_eq!(r[0], (bf(1.0) as u32) << 16 | bf(-2.0) as u32);
    let r = op32("cvt.rn.f16x2.f32", 2, &[[f(0.5), f(3.0), 0]]);
    assert_eq!(r[0], (hf(0.5) as u32) << 16 | hf(3.0) as u32);
}

#[test]
fn directed_rounding_at_binade_boundaries_signed_zeros_and_overflow() {
    let e60 = 2f32.powi(-60);
    let below_one = 1.0 - 2f32.powi(-24); // the largest f32 below 1
    // an exact value just below a power of two rounds within the binade below it
    assert_eq!(op32("add.rz.f32", 2, &[[f(1.0), f(-e60), 0]])[0], f(below_one));
    assert_eq!(op32("add.rm.f32", 2, &[[f(1.0), f(-e60), 0]])[0], f(below_one));
    assert_eq!(op32("add.rp.f32", 2, &[[f(1.0), f(-e60), 0]])[0], f(1.0));
    assert_eq!(op32("add.rp.f32", 2, &[[f(-1.0), f(e60), 0]])[0], f(-below_one));
    assert_eq!(op32("fma.rz.f32", 3, &[[f(1.0), f(1.0), f(-e60)]])[0], f(below_one));
    let r = run_op("cvt.rz.f32.f64 %d0, %s0", &[R::B32], &[R::B64], &[[(1.0 - 2f64.powi(-40)).to_bits(), 0, 0]]);
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
    assert_eq!(op32("fma.rm.f32", 3, &[[f(2.0), f(3.0), f(-6.0)]])[0], f(-0.0));
    let h = run_op("cvt.rn.f16.f32 %d0, %s0", &[R::B16], &[R::B32], &[[f(-0.0) as u64, 0, 0]]);
    assert_eq!(h[0][0], 0x8000, "-0 converts to -0");
    // f64: overflow rounds toward zero to the largest finite value; a division by zero
    // is an exact infinity
    let d = |x: f64| x.to_bits();
    let f64op = |inst: &str, a: f64, b: f64| f64::from_bits(run_op(&format!("{inst} %d0, %s0, %s1"), &[R::B64], &[R::B64, R::B64], &[[d(a), d(b), 0]])[0][0]);
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
    assert_eq!(f64op("div.rm.f64", 1.0, 3.0), 1.0 / 3.0, "1/3 rounds down to nearest");
    assert_eq!(f64op("div.rp.f64", 1.0, 3.0), (1.0f64 / 3.0).next_up());
    assert_eq!(f64op("sub.rm.f64", 1.0, 2f64.powi(-60)), 1.0f64.next_down());
}

/// The ulp of f32 at `x` (the gap above |x| rounded to f32).
fn ulp32(x: f64) -> f64 {
    let a = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (a.next_up() - a) as f64
}

#[test]
fn approx_functions_meet_their_documented_error_bounds() {
    // 9.7.3.13-22 and the table of each instruction: error bounds and special values
    let mut rng = Lcg(17);
    let xs = |rng: &mut Lcg, lo: f64, hi: f64, n: usize| -> Vec<f32> { (0..n).map(|_| (lo + (hi - lo) * rng.unit()) as f32).collect() };
    let run = |inst: &str, x: &[f32]| -> Vec<f32> {
        op32(inst, 1, &x.iter().map(|&v| [f(v), 0, 0]).collect::<Vec<_>>()).into_iter().map(fx).collect()
    };
    // ex2: 2 ulp over the full range
    let x = xs(&mut rng, -120.0, 120.0, 200);
    for (inst, got) in [("ex2.approx.f32", run("ex2.approx.f32", &x)), ("ex2.approx.ftz.f32", run("ex2.approx.ftz.f32", &x))] {
        for (&v, &r) in x.iter().zip(&got) {
            let want = (v as f64).exp2();
            if want < f32::MIN_POSITIVE as f64 && inst.contains("ftz") {
                continue;
            }
            assert!((r as f64 - want).abs() <= 2.0 * ulp32(want), "{inst} {v}: {r:e} vs {want:e}");
        }
    }
    // lg2: absolute 2^-22 in (0.5, 2), relative 2^-22 elsewhere
    let mut x = xs(&mut rng, 0.5, 2.0, 100);
    x.extend((0..100).map(|_| (2f64.powf(rng.unit() * 200.0 - 100.0)) as f32));
    for (&v, &r) in x.iter().zip(&run("lg2.approx.f32", &x)) {
        let want = (v as f64).log2();
        let bound = if v > 0.5 && v < 2.0 { 2f64.powi(-22) } else { want.abs() * 2f64.powi(-22) };
        assert!((r as f64 - want).abs() <= bound, "lg2 {v}: {r:e} vs {want:e}");
    }
    // rcp: 1 ulp; rsqrt: relative 2^-22.9; sqrt.approx: relative 2^-23
    let x: Vec<f32> = (0..200).map(|_| random_f32(&mut rng, -100, 100).abs()).collect();
    for ((&v, &rc), (&rs, &sq)) in x.iter().zip(&run("rcp.approx.f32", &x)).zip(run("rsqrt.approx.f32", &x).iter().zip(&run("sqrt.approx.f32", &x))) {
        let v = v as f64;
        assert!((rc as f64 - 1.0 / v).abs() <= ulp32(1.0 / v), "rcp {v:e}");
        assert!((rs as f64 - 1.0 / v.sqrt()).abs() <= 2f64.powf(-22.9) / v.sqrt(), "rsqrt {v:e}");
        assert!((sq as f64 - v.sqrt()).abs() <= 2f64.powi(-23) * v.sqrt(), "sqrt {v:e}");
    }
    // sin/cos: absolute 2^-20.5 in [-2pi, 2pi], 2^-14.7 in [-100pi, 100pi]
    let pi = std::f64::consts::PI;
    for (range, bound) in [(2.0 * pi, 2f64.powf(-20.5)), (100.0 * pi, 2f64.powf(-14.7))] {
        let x = xs(&mut rng, -range, range, 200);
        for ((&v, &s), &c) in x.iter().zip(&run("sin.approx.f32", &x)).zip(&run("cos.approx.ftz.f32", &x)) {
            assert!((s as f64 - (v as f64).sin()).abs() <= bound, "sin {v}");
            assert!((c as f64 - (v as f64).cos()).abs() <= bound, "cos {v}");
        }
    }
    // tanh (sm_75+): relative 2^-11, subnormals pass through
    let x = xs(&mut rng, -10.0, 10.0, 200);
    for (&v, &r) in x.iter().zip(&run("tanh.approx.f32", &x)) {
        let want = (v as f64).tanh();
        assert!((r as f64 - want).abs() <= want.abs() * 2f64.powi(-11), "tanh {v}");
    }
    // special values, from each instruction's table
    let inf = f32::INFINITY;
    let specials: [(&str, &[(f32, f32)]); 8] = [
        ("ex2.approx.f32", &[(-inf, 0.0), (0.0, 1.0), (-0.0, 1.0), (inf, inf)]),
        ("lg2.approx.f32", &[(-inf, f32::NAN), (-1.0, f32::NAN), (0.0, -inf), (-0.0, -inf), (inf, inf)]),
        ("rcp.approx.f32", &[(-inf, -0.0), (-0.0, -inf), (0.0, inf), (inf, 0.0)]),
        ("rsqrt.approx.f32", &[(-inf, f32::NAN), (-1.0, f32::NAN), (-0.0, -inf), (0.0, inf), (inf, 0.0)]),
        ("sqrt.approx.f32", &[(-inf, f32::NAN), (-1.0, f32::NAN), (-0.0, -0.0), (0.0, 0.0), (inf, inf)]),
        ("sin.approx.f32", &[(-inf, f32::NAN), (-0.0, -0.0), (0.0, 0.0)]),
        ("cos.approx.f32", &[(inf, f32::NAN), (-0.0, 1.0), (0.0, 1.0)]),
        ("tanh.approx.f32", &[(-inf, -1.0), (-0.0, -0.0), (inf, 1.0), (1e-40, 1e-40)]),
    ];
    for (inst, cases) in specials {
        let x: Vec<f32> = cases.iter().map(|c| c.0).chain([f32::NAN]).collect();
        let got = run(inst, &x);
        for (&(v, want), &r) in cases.iter().zip(&got) {
            let same = (want.is_nan() && r.is_nan()) || want.to_bits() == r.to_bits();
            assert!(same, "{inst}({v:e}) = {r:e}, want {want:e}");
        }
        assert!(got.last().unwrap().is_nan(), "{inst}(NaN)");
    }
}

#[test]
fn div_approx_and_full_within_two_ulp_and_the_large_divisor_rule() {
    // 9.7.3.8: div.approx = a * (1/b), 2 ulp for |b| in [2^-126, 2^126]; for
    // 2^126 < |b| < 2^128 the result is zero (NaN if a is infinite); div.full: 2 ulp
    let mut rng = Lcg(23);
    let cases: Vec<[u32; 3]> = (0..200).map(|_| [f(random_f32(&mut rng, -60, 60)), f(random_f32(&mut rng, -60, 60)), 0]).collect();
    for inst in ["div.approx.f32", "div.full.f32", "div.approx.ftz.f32", "div.full.ftz.f32"] {
        for (c, r) in cases.iter().zip(op32(inst, 2, &cases)) {
            let want = fx(c[0]) as f64 / fx(c[1]) as f64;
            assert!((fx(r) as f64 - want).abs() <= 2.0 * ulp32(want), "{inst} {:e}/{:e}", fx(c[0]), fx(c[1]));
        }
    }
    let big = 2f32.powi(127);
    let got = op32("div.approx.f32", 2, &[[f(1.0), f(big), 0], [f(-3.0), f(big), 0], [f(1.0), f(-big), 0], [f(f32::INFINITY), f(big), 0]]);
    assert_eq!(got[..3], [f(0.0), f(-0.0), f(-0.0)]);
    assert!(fx(got[3]).is_nan());
    // div.full has no such rule
    let got = op32("div.full.f32", 2, &[[f(1.0), f(big), 0]]);
    assert_eq!(fx(got[0]), 2f32.powi(-127));
}

#[test]
fn f64_approx_ftz_forms_work_on_the_upper_word() {
    // 9.7.3.14 rcp.approx.ftz.f64: d[63:32] = approx(1 / a[63:32]), d[31:0] = 0
    let d = |x: f64| x.to_bits();
    let cases = [[d(3.0), 0, 0], [d(-0.1), 0, 0], [d(1e300), 0, 0], [d(f64::NAN), 0, 0], [d(0.0), 0, 0]];
    let got = run_op("rcp.approx.ftz.f64 %d0, %s0", &[R::B64], &[R::B64], &cases);
    for (c, g) in cases.iter().zip(&got).take(3) {
        let (x, r) = (f64::from_bits(c[0]), g[0]);
        assert_eq!(r & 0xffff_ffff, 0, "low word of rcp({x})");
        assert!((f64::from_bits(r) - 1.0 / x).abs() <= (1.0 / x).abs() * 2f64.powi(-19), "rcp({x})");
    }
    assert_eq!(got[3][0], 0x7fff_ffff_0000_0000, "NaN gives the canonical NaN");
    assert_eq!(f64::from_bits(got[4][0]), f64::INFINITY);
    let got = run_op("rcp.rn.f64 %d0, %s0", &[R::B64], &[R::B64], &[[d(3.0), 0, 0]]);
    assert_eq!(f64::from_bits(got[0][0]), 1.0 / 3.0);
}

#[test]
fn integer_multiply_high_wide_and_mad() {
    let mut rng = Lcg(29);
    let vals: Vec<u64> = (0..64).map(|_| rng.next() ^ (rng.next() << 48)).chain([0, 1, u64::MAX, 1 << 63, 0x8000_0000, 0xffff_ffff]).collect();
    let cases: Vec<[u64; 3]> = vals.iter().zip(vals.iter().rev()).zip(vals.iter().skip(3).chain(&vals[..3])).map(|((&a, &b), &c)| [a, b, c]).collect();
    let run32 = |inst: &str, nsrc: usize| -> Vec<u64> {
        let ops = (0..nsrc).map(|i| format!("%s{i}")).collect::<Vec<_>>().join(", ");
        run_op(&format!("{inst} %d0, {ops}"), &[R::B32], &vec![R::B32; nsrc], &cases).iter().map(|r| r[0]).collect()
    };
    let run64 = |inst: &str, d: R, srcs: &[R]| -> Vec<u64> {
        let ops = (0..srcs.len()).map(|i| format!("%s{i}")).collect::<Vec<_>>().join(", ");
        run_op(&format!("{inst} %d0, {ops}"), &[d], srcs, &cases).iter().map(|r| r[0]).collect()
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
        assert_eq!(hi32[i], m32((u32s(a) * u32s(b)) >> 32), "mul.hi.u32 {a:x} {b:x}");
        assert_eq!(hi32s[i], m32((s32s(a) * s32s(b)) >> 32), "mul.hi.s32");
        assert_eq!(lo32[i], m32(s32s(a) * s32s(b)), "mul.lo.s32");
        assert_eq!(mad32[i], m32(u32s(a) * u32s(b) + u32s(c)), "mad.lo.u32");
        assert_eq!(madhi[i], m32(((s32s(a) * s32s(b)) >> 32) + s32s(c)), "mad.hi.s32");
        assert_eq!(wide_u[i], (u32s(a) * u32s(b)) as u64, "mul.wide.u32");
        assert_eq!(wide_s[i], (s32s(a) * s32s(b)) as u64, "mul.wide.s32");
        assert_eq!(madw[i], ((s32s(a) * s32s(b)) as u64).wrapping_add(c), "mad.wide.s32");
        assert_eq!(hi64[i], ((u64s(a) as u128 * u64s(b) as u128) >> 64) as u64, "mul.hi.u64");
        assert_eq!(hi64s[i], ((s64s(a) * s64s(b)) >> 64) as u64, "mul.hi.s64");
        assert_eq!(wide16[i], (a as u16 as i16 as i32 * b as u16 as i16 as i32) as u32 as u64, "mul.wide.s16");
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
    let r = run_op("shl.b64 %d0, %s0, %s1", &[R::B64], &[R::B64, R::B32], &[[3, 64, 0], [3, 62, 0]]);
    assert_eq!((r[0][0], r[1][0]), (0, 0xc000_0000_0000_0000));
    let r = run_op("shr.s64 %d0, %s0, %s1", &[R::B64], &[R::B64, R::B32], &[[1 << 63, 200, 0]]);
    assert_eq!(r[0][0], u64::MAX);
    // bfe (9.7.1.16): pos and len from the low 8 bits; signed fields sign-extend
    let bfe = |inst: &str, a: u32, pos: u32, len: u32| op32(inst, 3, &[[a, pos, len]])[0];
    assert_eq!(bfe("bfe.u32", 0xdead_beef, 8, 12), 0xdbe);
    assert_eq!(bfe("bfe.s32", 0xdead_beef, 8, 12), 0xffff_fdbe);
    assert_eq!(bfe("bfe.s32", 0x0000_7000, 12, 3), 0xffff_ffff);
    assert_eq!(bfe("bfe.u32", 0xffff_ffff, 28, 8), 0xf, "fields past bit 31 read no bits");
    assert_eq!(bfe("bfe.s32", 0x8000_0000, 40, 4), 0xffff_ffff, "pos past the msb gives the sign");
    assert_eq!(bfe("bfe.u32", 0xffff_ffff, 4, 0), 0);
    assert_eq!(bfe("bfe.u32", 0xffff_ffff, 0x104, 0x208), 0xff, "only the low 8 bits of b and c");
    // bfi f, a, b, pos, len: insert the low len bits of a into b at pos
    let r = run_op("bfi.b32 %d0, %s0, %s1, 8, 12", &[R::B32], &[R::B32, R::B32], &[[0x0000_0abc, 0xffff_ffff, 0]]);
    assert_eq!(r[0][0], 0xfffa_bcff);
    let r = run_op("bfi.b32 %d0, %s0, %s1, 28, 8", &[R::B32], &[R::B32, R::B32], &[[0xff, 0, 0]]);
    assert_eq!(r[0][0], 0xf000_0000);
    // prmt (9.7.9.7): byte selectors; msb of a selector replicates the byte's sign
    let prmt = |a: u32, b: u32, c: u32| op32("prmt.b32", 3, &[[a, b, c]])[0];
    assert_eq!(prmt(0x4433_2211, 0x8877_6655, 0x1074), 0x2211_8855);
    assert_eq!(prmt(0x0000_8070, 0, 0x8901), 0x00ff_7080);
    // lop3 (9.7.8.6): the truth table over (a, b, c) = (0xF0, 0xCC, 0xAA)
    let (a, b, c) = (0x1234_5678u32, 0x0f0f_f0f0u32, 0xff00_ff00u32);
    for lut in [0x96u32, 0xe8, 0x80, 0xfe, 0x1e, 0x00] {
        let r = run_op(&format!("lop3.b32 %d0, %s0, %s1, %s2, {lut}"), &[R::B32], &[R::B32; 3], &[[a as u64, b as u64, c as u64]])[0][0] as u32;
        let want = (0..32).map(|k| ((lut >> (((a >> k) & 1) << 2 | ((b >> k) & 1) << 1 | ((c >> k) & 1))) & 1) << k).sum::<u32>();
        assert_eq!(r, want, "lop3 {lut:#x}");
    }
    // shf (9.7.8.9): funnel shift of {b:a}
    let shf = |inst: &str, a: u32, b: u32, n: u32| op32(inst, 3, &[[a, b, n]])[0];
    assert_eq!(shf("shf.l.wrap.b32", 0x8000_0001, 0x0000_0002, 4), 0x0000_0028);
    assert_eq!(shf("shf.l.wrap.b32", 0x8000_0001, 0x0000_0002, 36), 0x0000_0028);
    assert_eq!(shf("shf.l.clamp.b32", 0x8000_0001, 0x0000_0002, 36), 0x8000_0001);
    assert_eq!(shf("shf.r.wrap.b32", 0x8000_0001, 0x0000_0003, 4), 0x3800_0000);
    assert_eq!(shf("shf.r.clamp.b32", 0x8000_0001, 0x0000_0003, 40), 0x0000_0003);
    // counts
    let un = |inst: &str, a: u32| op32(inst, 1, &[[a, 0, 0]])[0];
    assert_eq!((un("clz.b32", 0), un("clz.b32", 1), un("clz.b32", 0x8000_0000)), (32, 31, 0));
    assert_eq!((un("popc.b32", 0xf0f0_0001), un("popc.b32", u32::MAX)), (9, 32));
    assert_eq!(un("brev.b32", 0x0000_0001), 0x8000_0000);
    assert_eq!(un("brev.b32", 0x1234_5678), 0x1e6a_2c48);
    assert_eq!((un("bfind.u32", 0), un("bfind.u32", 0x0001_0000)), (u32::MAX, 16));
    assert_eq!((un("bfind.s32", 0xffff_fff0), un("bfind.s32", u32::MAX)), (3, u32::MAX));
    assert_eq!(un("bfind.shiftamt.u32", 0x0001_0000), 15);
    let r = run_op("clz.b64 %d0, %s0", &[R::B32], &[R::B64], &[[1 << 40, 0, 0]]);
    assert_eq!(r[0][0], 23);
    let r = run_op("popc.b64 %d0, %s0", &[R::B32], &[R::B64], &[[u64::MAX, 0, 0]]);
    assert_eq!(r[0][0], 64);
}

#[test]
fn integer_division_remainder_saturation_and_min_max() {
    let c = |inst: &str, a: u32, b: u32| op32(inst, 2, &[[a, b, 0]])[0];
    let neg = |x: i32| x as u32;
    assert_eq!(c("div.s32", neg(-7), 2), neg(-3), "truncates toward zero");
    assert_eq!(c("rem.s32", neg(-7), 3), neg(-1), "the remainder takes the dividend's sign");
    assert_eq!(c("rem.s32", 7, neg(-3)), 1);
    assert_eq!(c("div.u32", 7, 2), 3);
    // division by zero is unspecified (9.7.1.8); NVIDIA GPUs give all bits set
    assert_eq!((c("div.u32", 7, 0), c("div.s32", neg(-7), 0), c("rem.u32", 7, 0)), (u32::MAX, u32::MAX, u32::MAX));
    // INT_MIN / -1 wraps and does not trap
    assert_eq!((c("div.s32", 0x8000_0000, neg(-1)), c("rem.s32", 0x8000_0000, neg(-1))), (0x8000_0000, 0));
    assert_eq!(c("add.sat.s32", 0x7fff_ffff, 1), 0x7fff_ffff);
    assert_eq!(c("sub.sat.s32", 0x8000_0000, 1), 0x8000_0000);
    assert_eq!(c("add.s32", 0x7fff_ffff, 1), 0x8000_0000, "wraps without .sat");
    assert_eq!((c("min.s32", neg(-1), 1), c("min.u32", neg(-1), 1)), (neg(-1), 1));
    assert_eq!((c("max.s32", neg(-1), 1), c("max.u32", neg(-1), 1)), (1, neg(-1)));
    let un = |inst: &str, a: u32| op32(inst, 1, &[[a, 0, 0]])[0];
    assert_eq!((un("abs.s32", 0x8000_0000), un("neg.s32", 0x8000_0000)), (0x8000_0000, 0x8000_0000));
    assert_eq!((un("not.b32", 0x0f0f_0f0f), un("cnot.b32", 0), un("cnot.b32", 5)), (0xf0f0_f0f0, 1, 0));
    let r = run_op("sad.u32 %d0, %s0, %s1, %s2", &[R::B32], &[R::B32; 3], &[[3, 10, 100, ]]);
    assert_eq!(r[0][0], 107);
    let r = run_op("mul24.lo.u32 %d0, %s0, %s1", &[R::B32], &[R::B32; 2], &[[0xff00_0003, 0x0100_0005, 0]]);
    assert_eq!(r[0][0], 15, "mul24 uses the low 24 bits");
    let r = run_op("add.s16 %d0, %s0, %s1", &[R::B16], &[R::B16; 2], &[[0x7fff, 1, 0]]);
    assert_eq!(r[0][0], 0x8000);
    let r = run_op("div.s64 %d0, %s0, %s1", &[R::B64], &[R::B64; 2], &[[(-9i64) as u64, 2, 0]]);
    assert_eq!(r[0][0], (-4i64) as u64);
}

#[test]
fn half_precision_arithmetic_rounds_once_to_nearest() {
    // 9.7.4: f16/bf16 add, mul, fma (.rn) round the exact result once
    let mut rng = Lcg(31);
    let h = |x: f64| half::f16::from_f64(x);
    let b = |x: f64| half::bf16::from_f64(x);
    let mut cases: Vec<[u64; 3]> = Vec::new();
    for _ in 0..128 {
        let v = [0; 3].map(|_| (rng.unit() * 16.0 - 8.0) * 2f64.powi(rng.int(-6, 6) as i32));
        cases.push([h(v[0]).to_bits() as u64, h(v[1]).to_bits() as u64, h(v[2]).to_bits() as u64]);
    }
    // ties: 1 + 2^-11 is half an f16 ulp above 1
    cases.push([h(1.0).to_bits() as u64, h(2f64.powi(-11)).to_bits() as u64, 0]);
    let f16 = |x: u64| half::f16::from_bits(x as u16).to_f64();
    let run = |inst: &str, n: usize| -> Vec<u64> {
        let ops = (0..n).map(|i| format!("%s{i}")).collect::<Vec<_>>().join(", ");
        run_op(&format!("{inst} %d0, {ops}"), &[R::B16], &vec![R::B16; n], &cases).iter().map(|r| r[0]).collect()
    };
    let (add, mul, fma) = (run("add.rn.f16", 2), run("mul.rn.f16", 2), run("fma.rn.f16", 3));
    for (i, c) in cases.iter().enumerate() {
        let (x, y, z) = (f16(c[0]), f16(c[1]), f16(c[2]));
        assert_eq!(add[i] as u16, h(x + y).to_bits(), "add.f16 {x} {y}");
        assert_eq!(mul[i] as u16, h(x * y).to_bits(), "mul.f16 {x} {y}");
        assert_eq!(fma[i] as u16, h(x * y + z).to_bits(), "fma.f16 {x} {y} {z}");
    }
    assert_eq!(add[128] as u16, h(1.0).to_bits(), "tie to even");
    // f16 overflow and packed f16x2 (element 0 in the low half)
    let r = run_op("mul.rn.f16 %d0, %s0, %s1", &[R::B16], &[R::B16; 2], &[[h(300.0).to_bits() as u64, h(300.0).to_bits() as u64, 0]]);
    assert_eq!(r[0][0], 0x7c00);
    let pack = |lo: f64, hi: f64| (h(lo).to_bits() as u64) | (h(hi).to_bits() as u64) << 16;
    let r = run_op("add.rn.f16x2 %d0, %s0, %s1", &[R::B32], &[R::B32; 2], &[[pack(1.5, -2.0), pack(0.25, 8.0), 0]]);
    assert_eq!(r[0][0], pack(1.75, 6.0));
    // bf16 fma (sm_80) and add (sm_90)
    let bcases: Vec<[u64; 3]> = (0..64)
        .map(|_| [0; 3].map(|_| b((rng.unit() * 64.0 - 32.0) * 2f64.powi(rng.int(-20, 20) as i32)).to_bits() as u64))
        .collect();
    let bf = |x: u64| half::bf16::from_bits(x as u16).to_f64();
    let fma = run_op("fma.rn.bf16 %d0, %s0, %s1, %s2", &[R::B16], &[R::B16; 3], &bcases);
    let add = run_op("add.rn.bf16 %d0, %s0, %s1", &[R::B16], &[R::B16; 2], &bcases);
    for (i, c) in bcases.iter().enumerate() {
        let (x, y, z) = (bf(c[0]), bf(c[1]), bf(c[2]));
        assert_eq!(fma[i][0] as u16, b(x * y + z).to_bits(), "fma.bf16 {x} {y} {z}");
        assert_eq!(add[i][0] as u16, b(x + y).to_bits(), "add.bf16 {x} {y}");
    }
}

// ---------------------------------------------------------------------------------------
// 8. The cuBLAS twin (cuBLAS docs 2.7.1 gemm, 2.8.12 GemmEx, 2.8.14 GemmStridedBatchedEx)
// ---------------------------------------------------------------------------------------

/// Column-major `C = alpha op(A) op(B) + beta C` over a batch, in f64.
#[allow(clippy::too_many_arguments)]
fn gemm_ref(g: &Gemm, a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
    let mut out = c.to_vec();
    for i in 0..g.batch as usize {
        let (ao, bo, co) = (i * g.a.stride as usize, i * g.b.stride as usize, i * g.c.stride as usize);
        for col in 0..g.n as usize {
            for row in 0..g.m as usize {
                let mut s = 0.0;
                for p in 0..g.k as usize {
                    let x = if g.ta == Trans::N { a[ao + row + p * g.a.ld as usize] } else { a[ao + p + row * g.a.ld as usize] };
                    let y = if g.tb == Trans::N { b[bo + p + col * g.b.ld as usize] } else { b[bo + col + p * g.b.ld as usize] };
                    s += x * y;
                }
                let at = co + row + col * g.c.ld as usize;
                out[at] = g.alpha as f64 * s + if g.beta == 0.0 { 0.0 } else { g.beta as f64 * c[at] };
            }
        }
    }
    out
}

fn mat(ptr: u64, ty: DType, ld: i64, stride: i64) -> Mat {
    Mat { ptr, ty, ld, stride }
}

#[test]
fn gemm_transposes_leading_dimensions_and_strided_batches() {
    let (m, n, k, batch) = (5i64, 7i64, 9i64, 3i64);
    let mut rng = Lcg(41);
    for ta in [Trans::N, Trans::T] {
        for tb in [Trans::N, Trans::T] {
            for ty in [DType::F32, DType::Bf16] {
                let (ra, ca) = if ta == Trans::N { (m, k) } else { (k, m) };
                let (rb, cb) = if tb == Trans::N { (k, n) } else { (n, k) };
                let (lda, ldb, ldc) = (ra + 3, rb + 1, m + 2);
                let (sa, sb, sc) = (lda * ca + 5, ldb * cb + 2, ldc * n + 1);
                let na = (sa * batch) as usize;
                let nb = (sb * batch) as usize;
                let nc = (sc * batch) as usize;
                // values exact in bf16 so that the f64 reference sees what the GPU reads
                let a: Vec<f64> = (0..na).map(|_| rng.int(-64, 64) as f64 / 16.0).collect();
                let b: Vec<f64> = (0..nb).map(|_| rng.int(-64, 64) as f64 / 8.0).collect();
                let c: Vec<f64> = (0..nc).map(|_| rng.int(-100, 100) as f64).collect();
                let d = dev();
                let upload = |v: &[f64]| match ty {
                    DType::F32 => up(&d, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
                    DType::Bf16 => up(&d, &v.iter().map(|&x| half::bf16::from_f64(x)).collect::<Vec<_>>()),
                };
                let (pa, pb) = (upload(&a), upload(&b));
                let pc = up(&d, &c.iter().map(|&x| x as f32).collect::<Vec<_>>());
                let g = Gemm {
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha: 1.5,
                    a: mat(pa, ty, lda, sa),
                    b: mat(pb, ty, ldb, sb),
                    beta: -0.5,
                    c: mat(pc, DType::F32, ldc, sc),
                    batch,
                };
                d.gemm(&g).unwrap();
                let got: Vec<f32> = down(&d, pc, nc);
                let want = gemm_ref(&g, &a, &b, &c);
                for (i, (&x, &w)) in got.iter().zip(&want).enumerate() {
                    assert!((x as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "{ta:?}{tb:?} {ty:?} element {i}: {x} vs {w}");
                }
            }
        }
    }
}

#[test]
fn gemm_reads_bf16_inputs_as_the_gpu_rounds_them() {
    // 1/3 as bf16 is 0.333984375: the product uses that value, accumulated in f32
    let d = dev();
    let x = half::bf16::from_f64(1.0 / 3.0);
    let a = up(&d, &[x; 4]);
    let c = zeros::<f32>(&d, 1);
    let g = Gemm { ta: Trans::T, tb: Trans::N, m: 1, n: 1, k: 4, alpha: 1.0, a: mat(a, DType::Bf16, 4, 0), b: mat(a, DType::Bf16, 4, 0), beta: 0.0, c: mat(c, DType::F32, 1, 0), batch: 1 };
    d.gemm(&g).unwrap();
    let want = 4.0 * x.to_f64() * x.to_f64();
    assert!((down::<f32>(&d, c, 1)[0] as f64 - want).abs() < 1e-7, "{want}");
}

#[test]
fn gemm_beta_zero_writes_c_without_reading_it_and_alpha_zero_reads_no_operands() {
    let d = dev();
    let a = up(&d, &[1.0f32, 2.0, 3.0, 4.0]);
    let nan = up(&d, &[f32::NAN; 4]);
    let m2 = |p| mat(p, DType::F32, 2, 0);
    let g = Gemm { ta: Trans::N, tb: Trans::N, m: 2, n: 2, k: 2, alpha: 1.0, a: m2(a), b: m2(a), beta: 0.0, c: m2(nan), batch: 1 };
    d.gemm(&g).unwrap();
    assert_eq!(down::<f32>(&d, nan, 4), [7.0, 10.0, 15.0, 22.0], "NaN in C must not propagate when beta = 0");
    // C never written: fine with beta = 0, an initcheck finding with beta != 0
    let fresh = d.alloc(16, false).unwrap();
    d.gemm(&Gemm { c: m2(fresh), ..g }).unwrap();
    let fresh = d.alloc(16, false).unwrap();
    let e = d.gemm(&Gemm { c: m2(fresh), beta: 1.0, ..g }).unwrap_err().to_string();
    assert!(e.contains("initcheck") && e.contains("operand C"), "{e}");
    // k = 0: C = beta C; with beta = 0, C = 0 even if it held NaN
    let c = up(&d, &[f32::NAN; 4]);
    d.gemm(&Gemm { k: 0, c: m2(c), ..g }).unwrap();
    assert_eq!(down::<f32>(&d, c, 4), [0.0; 4]);
    // alpha = 0: A and B are not referenced (reference BLAS), so NaN there is harmless
    let nan = up(&d, &[f32::NAN; 4]);
    let c = up(&d, &[1.0f32, 2.0, 3.0, 4.0]);
    d.gemm(&Gemm { alpha: 0.0, a: m2(nan), b: m2(nan), beta: 2.0, c: m2(c), ..g }).unwrap();
    assert_eq!(down::<f32>(&d, c, 4), [2.0, 4.0, 6.0, 8.0]);
    // alpha = 0, beta = 1: a quick return, C untouched
    d.gemm(&Gemm { alpha: 0.0, beta: 1.0, c: m2(c), ..g }).unwrap();
    assert_eq!(down::<f32>(&d, c, 4), [2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn gemm_validates_arguments_like_cublas() {
    let d = dev();
    let p = up(&d, &[1.0f32; 64]);
    let q = up(&d, &[1.0f32; 64]);
    let base = Gemm { ta: Trans::N, tb: Trans::N, m: 4, n: 3, k: 2, alpha: 1.0, a: mat(p, DType::F32, 4, 0), b: mat(p, DType::F32, 2, 0), beta: 0.0, c: mat(q, DType::F32, 4, 0), batch: 1 };
    d.gemm(&base).unwrap();
    let f32m = |ld| mat(p, DType::F32, ld, 0);
    for (g, what) in [
        (Gemm { a: f32m(3), ..base }, "lda 3 < max(1, 4)"),
        (Gemm { ta: Trans::T, a: f32m(1), ..base }, "lda 1 < max(1, 2)"),
        (Gemm { b: f32m(1), ..base }, "ldb 1 < max(1, 2)"),
        (Gemm { tb: Trans::T, b: f32m(2), ..base }, "ldb 2 < max(1, 3)"),
        (Gemm { c: mat(q, DType::F32, 3, 0), ..base }, "ldc 3 < max(1, 4)"),
        (Gemm { m: -1, ..base }, "m=-1"),
        (Gemm { batch: -1, ..base }, "batchCount -1"),
        (Gemm { m: 0, c: mat(q, DType::F32, 0, 0), ..base }, "ldc 0 < max(1, 0)"),
    ] {
        let e = d.gemm(&g).unwrap_err().to_string();
        assert!(e.contains("CUBLAS_STATUS_INVALID_VALUE") && e.contains(what), "{what}: {e}");
    }
    let e = d.gemm(&Gemm { b: mat(p, DType::Bf16, 2, 0), ..base }).unwrap_err().to_string();
    assert!(e.contains("CUBLAS_STATUS_NOT_SUPPORTED"), "{e}");
    // zero-sized work is a successful no-op
    d.gemm(&Gemm { batch: 0, ..base }).unwrap();
    d.gemm(&Gemm { n: 0, ..base }).unwrap();
}

#[test]
fn gemm_operands_outside_their_allocations_are_memcheck_errors() {
    let d = dev();
    let small = up(&d, &[1.0f32; 7]);
    let big = up(&d, &[1.0f32; 64]);
    let out = zeros::<f32>(&d, 64);
    let base = Gemm { ta: Trans::N, tb: Trans::N, m: 4, n: 4, k: 2, alpha: 1.0, a: mat(big, DType::F32, 4, 0), b: mat(big, DType::F32, 2, 0), beta: 0.0, c: mat(out, DType::F32, 4, 0), batch: 1 };
    d.gemm(&base).unwrap();
    // A spans 4 x 2 = 8 floats
    let e = d.gemm(&Gemm { a: mat(small, DType::F32, 4, 0), ..base }).unwrap_err().to_string();
    assert!(e.contains("memcheck") && e.contains("operand A"), "{e}");
    // the second batch entry of C runs past the end
    let e = d.gemm(&Gemm { batch: 2, c: mat(out, DType::F32, 4, 60), ..base }).unwrap_err().to_string();
    assert!(e.contains("memcheck") && e.contains("operand C of batch entry 1"), "{e}");
    // a freed operand
    d.free(small).unwrap();
    let e = d.gemm(&Gemm { b: mat(small, DType::F32, 2, 0), ..base }).unwrap_err().to_string();
    assert!(e.contains("memcheck") && e.contains("freed"), "{e}");
}

// ---------------------------------------------------------------------------------------
// 9. Speed
// ---------------------------------------------------------------------------------------

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
    d.launch(&f, cfg(blocks, threads), &[p(px), p(py), Arg::F32(2.0), Arg::I32(n as i32)]).unwrap();
    let secs = start.elapsed().as_secs_f64();
    // 20 instructions per thread
    let rate = 20.0 * n as f64 / secs;
    println!("saxpy over {blocks} x {threads} threads: {secs:.3} s, {:.1} M lane-instructions/s", rate / 1e6);
    assert!(secs < 20.0, "a pathological slowdown: {secs:.1} s");
    let got: Vec<f32> = down(&d, py, n);
    assert!(got.iter().enumerate().all(|(i, &v)| v == 2.0 * (i % 1000) as f32 + (i % 7) as f32));
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
    ok(&d, &sm80(SPECIALS), "specials", LaunchConfig { grid, block, shared_bytes: 0 }, &[p(go)]);
    let o: Vec<u32> = down(&d, go, total * 8);
    for i in 0..total {
        let r = &o[8 * i..8 * i + 8];
        let (t, b) = (i % nb, i / nb);
        let lane = t % 32;
        assert_eq!((r[0] as usize, r[1] as usize), (t, b), "linear indices of thread {i}");
        assert_eq!((r[2] as usize, r[3] as usize, r[4] as usize), (lane, t / 32, nb.div_ceil(32)), "lane, warp, warps");
        assert_eq!((r[5], r[6]), ((1u32 << lane) - 1, !((1u32 << lane) - 1)), "lane masks");
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
    let f = fault(launch(&d, &ptx, "k3", LaunchConfig { grid: [1, 4, 1], block: [4, 2, 8], shared_bytes: 0 }, &[p(go)]));
    // the lowest block with a faulting thread is (0,0,0); its first such thread in linear
    // order (x fastest, then y, then z) has x + z = 7 with x < 4: (3,0,4), thread 35
    assert_eq!((f.check, f.block, f.thread, f.line), (Check::Memcheck, [0, 0, 0], [3, 0, 4], line_of(&ptx, "// BAD")), "{f}");
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

// ---------------------------------------------------------------------------------------
// Robustness: malformed PTX is refused with a line number, never a panic
// ---------------------------------------------------------------------------------------

#[test]
fn truncated_or_corrupted_modules_are_refused_without_panicking() {
    let d = dev();
    let mut rng = Lcg(97);
    for m in lalora_engine::backend::cuda::kernels::MODULES.iter().filter(|m| !m.ptx.is_empty()) {
        d.load_module(m.name, m.ptx).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        let lines: Vec<&str> = m.ptx.lines().collect();
        for _ in 0..40 {
            // a prefix cut inside a line, a line removed, two lines swapped, a token changed
            let cut = rng.int(0, m.ptx.len() as i64 - 1) as usize;
            let cut = (0..=cut).rev().find(|&i| m.ptx.is_char_boundary(i)).unwrap_or(0);
            let _ = d.load_module(m.name, &m.ptx[..cut]);
            let i = rng.int(0, lines.len() as i64 - 1) as usize;
            let j = rng.int(0, lines.len() as i64 - 1) as usize;
            let mut v = lines.clone();
            v.remove(i);
            let _ = d.load_module(m.name, &v.join("\n"));
            let mut v = lines.clone();
            v.swap(i, j);
            let _ = d.load_module(m.name, &v.join("\n"));
            let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            v[i] = v[i].replacen(['%', '[', ']', '{', ',', ';'], "", 1);
            let _ = d.load_module(m.name, &v.join("\n"));
        }
    }
    for bad in [
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  add.s32 %r1, %r2 %r3;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  bra $NOWHERE;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  frobnicate.b32 %r0, %r1;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  mov.b32 %r5, %r0;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k(\n{\n",
        ".version 9.0\n.target sm_80\n.address_size 32\n",
        "\"unterminated",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r0}, {%r0}, {%r0}, {%r0};\n}\n",
    ] {
        match d.load_module("bad", bad) {
            Err(SimError::Ptx(line, msg)) => assert!(line > 0 && !msg.is_empty(), "{bad}: {line}: {msg}"),
            other => panic!("{bad:?} was accepted: {:?}", other.map(|_| ())),
        }
    }
}

const LATE_FAULT: &str = r#"
.visible .entry late_fault(.param .u64 g)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [g];
    mov.u32 %r0, %ctaid.x;
    setp.ge.u32 %p1, %r0, 3;
    @%p1 bra $BAD;
    // the first blocks are slow and fine
    mov.u32 %r1, 0;
$LOOP:
    add.u32 %r1, %r1, 1;
    setp.lt.u32 %p1, %r1, 20000;
    @%p1 bra $LOOP;
    ret;
$BAD:
    ld.global.u32 %r2, [%rd1+64]; // BAD
    ret;
}
"#;

#[test]
fn the_reported_fault_is_the_lowest_faulting_block_whatever_the_timing() {
    // blocks run in parallel; the report must not depend on which worker faulted first
    let d = Device::new(Checks::default(), 1 << 20, 2).unwrap();
    let g = zeros::<u32>(&d, 4);
    for _ in 0..5 {
        let f = fault(launch(&d, &sm80(LATE_FAULT), "late_fault", cfg(64, 32), &[p(g)]));
        assert_eq!((f.check, f.block), (Check::Memcheck, [3, 0, 0]), "{f}");
    }
}

#[test]
fn matrix_instructions_check_rows_and_need_the_whole_warp() {
    let d = dev();
    let src = up(&d, &tile_values());
    let out = zeros::<u32>(&d, 128);
    // a row address that is not 16-byte aligned (9.7.14.5.15: rows are naturally aligned)
    let ptx = sm80(&LDMATRIX.replace("@INST@", "add.u32 %r8, %r8, 4;\n    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r9, %r10, %r11, %r12}, [%r8]; // LDM"));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!((f.check, f.line), (Check::Memcheck, line_of(&ptx, "// LDM")), "{f}");
    assert!(f.detail.contains("misaligned 16-byte"), "{f}");
    // a generic address into global memory
    let ptx = sm80(&LDMATRIX.replace("@INST@", "ldmatrix.sync.aligned.m8n8.x1.b16 {%r9}, [%rd1]; // LDM"));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!((f.check, f.line), (Check::Memcheck, line_of(&ptx, "// LDM")), "{f}");
    assert!(f.detail.contains("not in shared memory"), "{f}");
    // .sync.aligned: every lane of the warp executes it (9.7.14.5.14)
    let body = "setp.ne.u32 %p1, %r0, 3;\n    @%p1 ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r9}, [%r8]; // LDM";
    let ptx = sm80(&LDMATRIX.replace("@INST@", body).replace(".reg .b32 %r<16>;", ".reg .b32 %r<16>;\n    .reg .pred %p<2>;"));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!((f.check, f.thread, f.line), (Check::Synccheck, [3, 0, 0], line_of(&ptx, "// LDM")), "{f}");
    let body = "setp.eq.u32 %p1, %r0, 3;\n    @%p1 ret;\n    ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r9}, [%r8]; // LDM";
    let ptx = sm80(&LDMATRIX.replace("@INST@", body).replace(".reg .b32 %r<16>;", ".reg .b32 %r<16>;\n    .reg .pred %p<2>;"));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!((f.check, f.line), (Check::Synccheck, line_of(&ptx, "// LDM")), "{f}");
    assert!(f.detail.contains("exited"), "{f}");
}
