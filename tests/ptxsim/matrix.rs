//! 1. Warp-level matrix instructions (9.7.14/15: mma, ldmatrix, stmatrix; 9.7.9.25 cp.async)

use super::*;

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
        (8, In::Tf32) => vec![
            [(g, t); 2],
            [(g + 8, t); 2],
            [(g, t + 4); 2],
            [(g + 8, t + 4); 2],
        ],
        (8, _) => vec![
            [(g, 2 * t), (g, 2 * t + 1)],
            [(g + 8, 2 * t), (g + 8, 2 * t + 1)],
        ],
        (4, In::Tf32) => vec![[(g, t); 2], [(g + 8, t); 2]],
        _ => unreachable!(),
    }
}

fn frag_b(k: usize, ty: In, lane: usize) -> Vec<[(usize, usize); 2]> {
    let (g, t) = (lane / 4, lane % 4);
    match (k, ty) {
        (16, _) => vec![
            [(2 * t, g), (2 * t + 1, g)],
            [(2 * t + 8, g), (2 * t + 9, g)],
        ],
        (8, In::Tf32) => vec![[(t, g); 2], [(t + 4, g); 2]],
        (8, _) => vec![[(2 * t, g), (2 * t + 1, g)]],
        (4, In::Tf32) => vec![[(t, g); 2]],
        _ => unreachable!(),
    }
}

/// C/D of every m16n8 shape: c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1).
fn frag_c(lane: usize) -> [(usize, usize); 4] {
    let (g, t) = (lane / 4, lane % 4);
    [
        (g, 2 * t),
        (g, 2 * t + 1),
        (g + 8, 2 * t),
        (g + 8, 2 * t + 1),
    ]
}

/// A kernel that loads each lane's fragment registers, runs `inst` once and stores D.
fn mma_kernel(inst: &str, na: usize, nb: usize, nc: usize) -> String {
    let list = |r: &str, n: usize| {
        (0..n)
            .map(|i| format!("%{r}{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = String::from(
        ".visible .entry mma(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 pd)\n{\n\
         .reg .b32 %a<4>, %b<4>, %c<4>, %d<4>, %lane;\n.reg .b64 %rd<12>;\n\
         mov.u32 %lane, %laneid;\n\
         ld.param.u64 %rd1, [pa];\nld.param.u64 %rd2, [pb];\nld.param.u64 %rd3, [pc];\nld.param.u64 %rd4, [pd];\n",
    );
    for (base, name, n, reg) in [
        (1, "a", na, 5),
        (2, "b", nb, 6),
        (3, "c", nc, 7),
        (4, "d", nc, 8),
    ] {
        s += &format!(
            "mul.wide.u32 %rd{reg}, %lane, {};\nadd.u64 %rd{reg}, %rd{base}, %rd{reg};\n",
            4 * n
        );
        if name != "d" {
            for i in 0..n {
                s += &format!("ld.global.b32 %{name}{i}, [%rd{reg}+{}];\n", 4 * i);
            }
        }
    }
    s += &format!(
        "{inst} {{{}}}, {{{}}}, {{{}}}, {{{}}};\n",
        list("d", nc),
        list("a", na),
        list("b", nb),
        list("c", nc)
    );
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
    let inst = format!(
        "mma.sync.aligned.m16n8k{k}.row.col.{acc}.{t}.{t}.{acc}",
        t = ty.name()
    );
    let d = dev();
    let (pa, pb, pc) = (up(&d, &fa), up(&d, &fb), up(&d, &fc));
    let pd = zeros::<u32>(&d, 32 * nc);
    ok(
        &d,
        &sm80(&mma_kernel(&inst, na, nb, nc)),
        "mma",
        cfg(1, 32),
        &[p(pa), p(pb), p(pc), p(pd)],
    );
    let out: Vec<u32> = down(&d, pd, 32 * nc);
    let mut seen = [[false; 8]; 16];
    for lane in 0..32 {
        for (i, (r, col)) in frag_c(lane).into_iter().enumerate() {
            let got = if f16_acc {
                half::f16::from_bits((out[lane * 2 + i / 2] >> (16 * (i % 2))) as u16).to_f64()
            } else {
                f32::from_bits(out[lane * 4 + i]) as f64
            };
            assert_eq!(
                got,
                want[r * 8 + col],
                "{inst}: D[{r}][{col}] (lane {lane}, d{i})"
            );
            seen[r][col] = true;
        }
    }
    assert!(
        seen.iter().flatten().all(|&s| s),
        "{inst}: D covers the 16x8 tile"
    );
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
    ok(
        &d,
        &sm80(&mma_kernel(inst, 4, 2, 4)),
        "mma",
        cfg(1, 32),
        &[p(pa), p(pb), p(pc), p(pd)],
    );
    let out: Vec<f32> = down(&d, pd, 128);
    // lane 0 holds D[0][0] in d0
    assert_eq!(out[0], 1.0 + 2f32.powi(-12));
}

/// Bytes of a shared tile of 32 rows of 8 b16 values (row `s` = slot `s`), distinct values.
pub(super) fn tile_values() -> Vec<u16> {
    (0..32 * 8)
        .map(|i| (i as u16).wrapping_mul(37).wrapping_add(11))
        .collect()
}

/// The slot whose row lane `l` addresses: rows need not be contiguous (9.7.14.5.15).
fn slot(l: usize) -> usize {
    (l * 7) % 32
}

pub(super) const LDMATRIX: &str = r#"
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
    let enc = |v: &[f64]| {
        v.iter()
            .map(|&x| In::Bf16.enc(x) as u16)
            .collect::<Vec<u16>>()
    };
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
                    .replace(
                        "@STORE@",
                        &format!(
                            "stmatrix.sync.aligned.m8n8.{num}{t}.shared.b16 [%r15], {{{srcs}}};"
                        ),
                    )
                    .replace(
                        "@LOAD@",
                        &format!(
                            "ldmatrix.sync.aligned.m8n8.{num}{t}.shared.b16 {{{dsts}}}, [%r15];"
                        ),
                    ),
            );
            let d = dev();
            let (out, back) = (zeros::<u16>(&d, 256), zeros::<u32>(&d, 128));
            ok(&d, &ptx, "stm", cfg(1, 32), &[p(out), p(back)]);
            let tile: Vec<u16> = down(&d, out, 256);
            let mut want = vec![0u16; 256];
            for l in 0..32 {
                for j in 0..n {
                    for h in 0..2 {
                        let (row, col) = if trans {
                            (2 * (l % 4) + h, l / 4)
                        } else {
                            (l / 4, 2 * (l % 4) + h)
                        };
                        want[slot(8 * j + row) * 8 + col] = reg(l, j)[h];
                    }
                }
            }
            assert_eq!(tile, want, "stmatrix.{num}{t}");
            let back: Vec<u32> = down(&d, back, 128);
            for l in 0..32 {
                for j in 0..n {
                    let [lo, hi] = reg(l, j);
                    assert_eq!(
                        back[l * 4 + j],
                        lo as u32 | ((hi as u32) << 16),
                        "round trip {num}{t} lane {l} reg {j}"
                    );
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
                .replace(
                    "@WAIT@",
                    "cp.async.commit_group;\n    cp.async.wait_group 0;",
                )
                .replace("@SIZE@", &size.to_string()),
        );
        let d = dev();
        let (gs, go) = (up(&d, &src), zeros::<u8>(&d, 512));
        ok(
            &d,
            &ptx,
            "cpa",
            cfg(1, 32),
            &[p(gs), p(go), Arg::I32(n.unwrap_or(0) as i32)],
        );
        let out: Vec<u8> = down(&d, go, 512);
        for l in 0..32 {
            for i in 0..16 {
                let want = if i >= size || i >= n.map_or(size, |n| n as usize) {
                    0
                } else {
                    src[l * 16 + i]
                };
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
    let ptx = sm80(
        &CPASYNC
            .replace("@COPY@", copy)
            .replace("@WAIT@", "cp.async.wait_all;")
            .replace("@SIZE@", "16"),
    );
    let d = dev();
    let (gs, go) = (up(&d, &src), zeros::<u8>(&d, 512));
    ok(&d, &ptx, "cpa", cfg(1, 32), &[p(gs), p(go), Arg::I32(0)]);
    let out: Vec<u8> = down(&d, go, 512);
    for l in 0..32 {
        let want: Vec<u8> = if l % 2 == 1 {
            vec![0; 16]
        } else {
            src[l * 16..l * 16 + 16].to_vec()
        };
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
    let build = |wait: &str| {
        sm80(
            &CPASYNC
                .replace("@COPY@", copy)
                .replace("@WAIT@", wait)
                .replace("@SIZE@", "4"),
        )
    };
    let d = dev();
    let (gs, go) = (up(&d, &src), zeros::<u8>(&d, 512));
    ok(
        &d,
        &build("cp.async.wait_all;"),
        "cpa",
        cfg(1, 32),
        &[p(gs), p(go), Arg::I32(0)],
    );
    let out: Vec<u8> = down(&d, go, 512);
    assert_eq!(out[16..20], src[16..20]);
    let ptx = build("cp.async.wait_group 0;");
    let f = fault(launch(
        &d,
        &ptx,
        "cpa",
        cfg(1, 32),
        &[p(gs), p(go), Arg::I32(0)],
    ));
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
    let f = fault(launch(
        &d,
        &ptx,
        "pipe",
        cfg(1, 32),
        &[p(gs), p(go), Arg::I32(1)],
    ));
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
    ok(
        &d,
        &sm80(&CP_OTHER.replace("@SYNC@", "bar.sync 0;")),
        "other",
        cfg(1, 64),
        &[p(gs), p(go)],
    );
    assert_eq!(down::<u32>(&d, go, 1), [0xdead_beef]);
    let ptx = sm80(&CP_OTHER.replace("@SYNC@", ""));
    let f = fault(launch(&d, &ptx, "other", cfg(1, 64), &[p(gs), p(go)]));
    assert_eq!(f.check, Check::Racecheck, "{f}");
    assert_eq!(
        (f.thread, f.line),
        ([33, 0, 0], line_of(&ptx, "// READ")),
        "{f}"
    );
    assert!(
        f.detail.contains("read-after-write") && f.detail.contains("thread (0,0,0)"),
        "{f}"
    );
}
