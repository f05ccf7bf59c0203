//! The kernels with 128-bit accesses (`for_each_pack` in kernels/common.cuh) on
//! operands the `Backend` API never hands them: pointers one element past a 16-byte
//! boundary (the single-element path throughout) and lengths with a tail after the
//! last whole pack, against the CPU backend on the simulator.

use half::bf16;

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::runtime::{Arg, LaunchConfig};
use crate::backend::cuda::{BaseDtype, DevBuf};
use crate::selftest::rel_err;

/// One rounding per element apart at most (a fused multiply-add on the device where
/// the CPU rounds the product first), so far below the f32 bound of 1e-4; a pack read
/// or written at the wrong place is off by O(1).
const BOUND: f64 = 1e-6;

/// An f32 result stored as bf16: one rounding to nearest, at most 2^-8 / (1 + 2^-8) =
/// 0.00389 relative per element (bf16 keeps 8 significant bits); the bound 2^-8 leaves
/// 1.5e-5 for `BOUND`.
const BF16_STORE: f64 = 1.0 / 256.0;

/// Two blocks of 64 threads: the grid-stride loops wrap over both the packs and the
/// single elements (a launch sized by `packed` covers a buffer in one sweep).
const SMALL_GRID: LaunchConfig = LaunchConfig {
    grid: [2, 1, 1],
    block: [64, 1, 1],
    shared_bytes: 0,
};

/// `host` on the device `off` elements past an allocation's (256-byte aligned) start:
/// the buffer and the pointer to element 0.
fn at(g: &CudaBackend, host: &[f32], off: usize) -> (Act, u64) {
    let mut v = vec![0.5f32; off];
    v.extend_from_slice(host);
    let b = g.buf(v).expect("upload");
    let p = b.addr() + 4 * off as u64;
    (b, p)
}

/// `host` rounded to bf16 on the device `off` elements past an allocation's start: the
/// buffer, the pointer to element 0 and the values it holds (widened, exact).
fn at_bf16(g: &CudaBackend, host: &[f32], off: usize) -> (DevBuf<u16>, u64, Vec<f32>) {
    let mut bits = vec![0u16; off];
    bits.extend(host.iter().map(|&v| bf16::from_f32(v).to_bits()));
    let held = bits[off..]
        .iter()
        .map(|&h| bf16::from_bits(h).to_f32())
        .collect();
    let b = g.upload(&bits).expect("upload");
    let p = b.ptr() + 2 * off as u64;
    (b, p, held)
}

/// `b`'s bf16 elements from `off` on, widened.
fn back_bf16(g: &CudaBackend, b: &DevBuf<u16>, off: usize) -> Vec<f32> {
    g.download(b).expect("download")[off..]
        .iter()
        .map(|&h| bf16::from_bits(h).to_f32())
        .collect()
}

/// Bit for bit: `got` is `want` (an f32 result) rounded to nearest even.
fn rounded(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&h, &f)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            h.to_bits(),
            bf16::from_f32(f).to_f32().to_bits(),
            "{what}: element {i} is not the f32 result rounded"
        );
    }
}

fn back(g: &CudaBackend, b: &Act, off: usize) -> Vec<f32> {
    g.to_host(b).expect("download")[off..].to_vec()
}

fn random(n: usize, seed: u32) -> Vec<f32> {
    // A fixed scramble of the index in (-1, 1), never zero.
    (0..n as u32)
        .map(|i| {
            let h = (i ^ seed).wrapping_mul(0x9e37_79b9).rotate_left(13);
            (h % 2001) as f32 / 1000.5 - 0.999
        })
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    let (rel, _) = rel_err(got, want);
    assert!(rel < BOUND, "{what}: relative error {rel:e}");
}

#[test]
#[cfg_attr(
    not(lalora_cuda_kernels),
    ignore = "built without CUDA kernels (no nvcc)"
)]
fn packed_kernels_take_unaligned_operands_and_tails() {
    let g = CudaBackend::sim(2, BaseDtype::F32).expect("the simulator starts");
    let cpu = CpuBackend::new(2);
    // Offsets 0, 4 and 8: aligned f32 (packs, then a tail of n % 4 or n % 8), and at 0 and
    // 8 aligned bf16 too; 1: unaligned.
    for (off, n) in [
        (0, 1027),
        (4, 1030),
        (8, 1029),
        (1, 1027),
        (1, 1024),
        (0, 3),
    ] {
        let case = format!("offset {off}, n {n}");
        let (x, y) = (random(n, 1), random(n, 2));
        let cfg = SMALL_GRID;
        let len = Arg::U64(n as u64);

        let (a, pa) = at(&g, &x, off);
        let (_b, pb) = at(&g, &y, off);
        g.launch("add_assign", cfg, &[Arg::U64(pa), Arg::U64(pb), len])
            .expect("add_assign");
        let mut want = x.clone();
        cpu.add_assign(&mut want, &y).expect("cpu");
        close(&format!("add_assign, {case}"), &back(&g, &a, off), &want);

        let (a, pa) = at(&g, &x, off);
        g.launch(
            "axpy",
            cfg,
            &[Arg::F32(0.3), Arg::U64(pb), Arg::U64(pa), len],
        )
        .expect("axpy");
        let mut want = x.clone();
        cpu.axpy(0.3, &y, &mut want).expect("cpu");
        close(&format!("axpy, {case}"), &back(&g, &a, off), &want);

        let (a, pa) = at(&g, &x, off);
        g.launch("mul_assign", cfg, &[Arg::U64(pa), Arg::U64(pb), len])
            .expect("mul_assign");
        let mut want = x.clone();
        cpu.mul_assign(&mut want, &y).expect("cpu");
        close(&format!("mul_assign, {case}"), &back(&g, &a, off), &want);

        let (a, pa) = at(&g, &x, off);
        g.launch("scale", cfg, &[Arg::U64(pa), Arg::F32(-1.7), len])
            .expect("scale");
        let mut want = x.clone();
        cpu.scale(&mut want, -1.7).expect("cpu");
        close(&format!("scale, {case}"), &back(&g, &a, off), &want);

        let (o, po) = at(&g, &vec![0.0; n], off);
        let (_a, pa) = at(&g, &x, off);
        g.launch(
            "swiglu_forward_f32",
            cfg,
            &[Arg::U64(pa), Arg::U64(pb), Arg::U64(po), len],
        )
        .expect("swiglu_forward_f32");
        let want = cpu.swiglu(&x, &y).expect("cpu");
        let stored_f32 = back(&g, &o, off);
        close(&format!("swiglu, {case}"), &stored_f32, &want);

        // The bf16 output (packs of eight) `off` bf16 past an aligned start.
        let out = g.zeroed::<u16>(off + n).expect("alloc");
        let args = [
            Arg::U64(pa),
            Arg::U64(pb),
            Arg::U64(out.ptr() + 2 * off as u64),
            len,
        ];
        g.launch("swiglu_forward_bf16", cfg, &args)
            .expect("swiglu_forward_bf16");
        let got: Vec<f32> = g.download(&out).expect("download")[off..]
            .iter()
            .map(|&h| bf16::from_bits(h).to_f32())
            .collect();
        let (rel, _) = rel_err(&got, &want);
        assert!(
            rel < BF16_STORE,
            "swiglu bf16, {case}: relative error {rel:e}"
        );
        // The same f32 arithmetic as the f32 entry, then one rounding to nearest even.
        for (i, (&h, &f)) in got.iter().zip(&stored_f32).enumerate() {
            assert_eq!(
                h.to_bits(),
                bf16::from_f32(f).to_f32().to_bits(),
                "swiglu bf16, {case}: element {i} is not the f32 result rounded"
            );
        }

        let (p, pp) = at(&g, &x, off);
        let (m, pm) = at(&g, &random(n, 3), off);
        let (v, pv) = at(
            &g,
            &random(n, 4).iter().map(|e| e * e).collect::<Vec<_>>(),
            off,
        );
        let h = AdamHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
        };
        let (bc1, bc2) = (1.0 - 0.9f32.powi(3), 1.0 - 0.99f32.powi(3));
        let args = [
            Arg::U64(pp),
            Arg::U64(pb),
            Arg::U64(pm),
            Arg::U64(pv),
            len,
            Arg::F32(h.lr),
            Arg::F32(h.beta1),
            Arg::F32(h.beta2),
            Arg::F32(h.eps),
            Arg::F32(h.weight_decay),
            Arg::F32(bc1),
            Arg::F32(bc2),
            Arg::F32(0.5),
            Arg::U64(pb),
            Arg::U64(pb),
            Arg::F32(0.0),
            Arg::I32(0),
        ];
        g.launch("adamw_step", cfg, &args).expect("adamw_step");
        let (mut wp, mut wm) = (x.clone(), random(n, 3));
        let mut wv: Vec<f32> = random(n, 4).iter().map(|e| e * e).collect();
        cpu.adamw_step(&mut wp, &y, &mut wm, &mut wv, &h, 0.5, None)
            .expect("cpu");
        close(&format!("adamw p, {case}"), &back(&g, &p, off), &wp);
        close(&format!("adamw m, {case}"), &back(&g, &m, off), &wm);
        close(&format!("adamw v, {case}"), &back(&g, &v, off), &wv);

        // f32 -> bf16 in packs of 8: the output `off` bf16 past an aligned start.
        let (_a, pa) = at(&g, &x, off);
        let out = g.zeroed::<u16>(off + n).expect("alloc");
        let args = [Arg::U64(pa), Arg::U64(out.ptr() + 2 * off as u64), len];
        g.launch("f32_to_bf16", SMALL_GRID, &args)
            .expect("f32_to_bf16");
        let got = &g.download(&out).expect("download")[off..];
        let want: Vec<u16> = x.iter().map(|&e| bf16::from_f32(e).to_bits()).collect();
        assert_eq!(got, &want[..], "f32_to_bf16, {case}");

        // And back, exactly: the bf16 input and the f32 output `off` elements in.
        let mut bits = vec![0u16; off];
        bits.extend_from_slice(&want);
        let src = g.upload(&bits).expect("upload");
        let (o, po) = at(&g, &vec![0.0; n], off);
        let args = [Arg::U64(src.ptr() + 2 * off as u64), Arg::U64(po), len];
        g.launch("bf16_to_f32", SMALL_GRID, &args)
            .expect("bf16_to_f32");
        let exact: Vec<f32> = want.iter().map(|&h| bf16::from_bits(h).to_f32()).collect();
        assert_eq!(back(&g, &o, off), exact, "bf16_to_f32, {case}");
    }
}

/// SwiGLU on bf16 gate and up (the gate/up projections' outputs with bf16 base weights):
/// the same f32 arithmetic as the f32-input entries on the values the bf16 ones hold, so
/// the forward and backward (both stored bf16) are theirs rounded once, bit for bit, and
/// the backward stored f32 (KFAC reduce passes) is theirs exactly.
/// Offsets 0 and 8 are aligned bf16 packs of eight (then a tail of n % 8); 4 and 1 are
/// not (single elements throughout).
#[test]
#[cfg_attr(
    not(lalora_cuda_kernels),
    ignore = "built without CUDA kernels (no nvcc)"
)]
fn swiglu_reads_bf16_gate_and_up() {
    let g = CudaBackend::sim(2, BaseDtype::Bf16).expect("the simulator starts");
    for (off, n) in [(0, 1029), (8, 1027), (4, 1024), (1, 13)] {
        let case = format!("offset {off}, n {n}");
        let len = Arg::U64(n as u64);
        let (_gb, pg, gate) = at_bf16(&g, &random(n, 8), off);
        let (_ub, pu, up) = at_bf16(&g, &random(n, 9), off);
        let (_gf, pgf) = at(&g, &gate, off);
        let (_uf, puf) = at(&g, &up, off);

        let out = g.zeroed::<u16>(off + n).expect("alloc");
        let po = out.ptr() + 2 * off as u64;
        let args = [Arg::U64(pg), Arg::U64(pu), Arg::U64(po), len];
        g.launch("swiglu_forward_bf16_in", SMALL_GRID, &args)
            .expect("swiglu_forward_bf16_in");
        let (o, pof) = at(&g, &vec![0.0; n], off);
        let args = [Arg::U64(pgf), Arg::U64(puf), Arg::U64(pof), len];
        g.launch("swiglu_forward_f32", SMALL_GRID, &args)
            .expect("swiglu_forward_f32");
        rounded(
            &format!("swiglu bf16 in, {case}"),
            &back_bf16(&g, &out, off),
            &back(&g, &o, off),
        );

        // The backward: the bf16 entry's gradients (stored bf16) are the f32 entry's on
        // the same values, rounded once.
        let (_d, pd) = at(&g, &random(n, 10), off);
        let (dg, pdg) = at(&g, &vec![0.0; n], off);
        let (du, pdu) = at(&g, &vec![0.0; n], off);
        let args = [pd, pgf, puf, pdg, pdu].map(Arg::U64);
        g.launch("swiglu_backward", SMALL_GRID, &[&args[..], &[len]].concat())
            .expect("swiglu_backward");
        let (dgb, dub) = (
            g.zeroed::<u16>(off + n).expect("alloc"),
            g.zeroed::<u16>(off + n).expect("alloc"),
        );
        let (pdgb, pdub) = (dgb.ptr() + 2 * off as u64, dub.ptr() + 2 * off as u64);
        let args = [pd, pg, pu, pdgb, pdub].map(Arg::U64);
        g.launch(
            "swiglu_backward_bf16",
            SMALL_GRID,
            &[&args[..], &[len]].concat(),
        )
        .expect("swiglu_backward_bf16");
        for (name, got, want) in [("dgate", &dgb, &dg), ("dup", &dub, &du)] {
            rounded(
                &format!("swiglu backward bf16 {name}, {case}"),
                &back_bf16(&g, got, off),
                &back(&g, want, off),
            );
        }
        // The bf16-in entry (KFAC reduce: gradients stored f32) is the f32 entry's,
        // bit for bit.
        let (dgf, pdgf) = at(&g, &vec![0.0; n], off);
        let (duf, pduf) = at(&g, &vec![0.0; n], off);
        let args = [pd, pg, pu, pdgf, pduf].map(Arg::U64);
        g.launch(
            "swiglu_backward_bf16_in",
            SMALL_GRID,
            &[&args[..], &[len]].concat(),
        )
        .expect("swiglu_backward_bf16_in");
        assert_eq!(
            (back(&g, &dgf, off), back(&g, &duf, off)),
            (back(&g, &dg, off), back(&g, &du, off)),
            "swiglu backward bf16 in, {case}"
        );
    }
}

/// RoPE with whole float4s per half head (hd 8) and without (hd 6), on rows that
/// start off a 16-byte boundary (offset 1) and on aligned ones.
#[test]
#[cfg_attr(
    not(lalora_cuda_kernels),
    ignore = "built without CUDA kernels (no nvcc)"
)]
fn rope_takes_unaligned_rows_and_odd_half_heads() {
    let g = CudaBackend::sim(2, BaseDtype::F32).expect("the simulator starts");
    let cpu = CpuBackend::new(2);
    let (rows, heads, period) = (9, 3, 4);
    for (off, hd) in [(0, 8), (1, 8), (0, 6)] {
        let half = hd / 2;
        let n = rows * heads * hd;
        let (x, cos, sin) = (
            random(n, 5),
            random(period * half, 6),
            random(period * half, 7),
        );
        let (b, px) = at(&g, &x, off);
        let (_c, pc) = at(&g, &cos, off);
        let (_s, ps) = at(&g, &sin, off);
        let args = [
            Arg::U64(px),
            Arg::U64(pc),
            Arg::U64(ps),
            Arg::I32(rows as i32),
            Arg::I32(heads as i32),
            Arg::I32(hd as i32),
            Arg::I32(period as i32),
            Arg::F32(1.0),
        ];
        g.launch("rope", SMALL_GRID, &args).expect("rope");
        let mut want = x.clone();
        let table = RopeTable { cos, sin, period };
        cpu.rope(&mut want, &table, rows, heads, hd, false)
            .expect("cpu");
        close(
            &format!("rope, offset {off}, hd {hd}"),
            &back(&g, &b, off),
            &want,
        );
    }
}

/// RoPE in place on bf16 rows (q and k with bf16 base weights): the f32 entry's arithmetic
/// on the values they hold, rounded once, bit for bit. Packs of eight per half head at
/// hd 16 (offsets 0 and 8 aligned, 4 not), single elements at hd 8 and 6.
#[test]
#[cfg_attr(
    not(lalora_cuda_kernels),
    ignore = "built without CUDA kernels (no nvcc)"
)]
fn rope_bf16_is_the_f32_rotation_rounded() {
    // Both bf16 entries: in place on bf16 values, and from f32 sums into a bf16 buffer.
    let g = CudaBackend::sim(2, BaseDtype::Bf16).expect("the simulator starts");
    let (rows, heads, period) = (9, 3, 4);
    for (off, hd) in [(0, 16), (8, 16), (4, 16), (0, 8), (1, 6)] {
        let half = hd / 2;
        let n = rows * heads * hd;
        let (cos, sin) = (random(period * half, 6), random(period * half, 7));
        let (_c, pc) = at(&g, &cos, 0);
        let (_s, ps) = at(&g, &sin, 0);
        let (b, px, held) = at_bf16(&g, &random(n, 5), off);
        let (f, pf) = at(&g, &held, off);
        // rope_f32_to_bf16 reads an unrotated f32 copy and writes a bf16 buffer.
        let (_f2, pf2) = at(&g, &held, off);
        let (o, po, _) = at_bf16(&g, &vec![0.0; n], off);
        let dims = [
            Arg::I32(rows as i32),
            Arg::I32(heads as i32),
            Arg::I32(hd as i32),
            Arg::I32(period as i32),
            Arg::F32(-1.0),
        ];
        for (kernel, io) in [
            ("rope_bf16", vec![Arg::U64(px)]),
            ("rope", vec![Arg::U64(pf)]),
            ("rope_f32_to_bf16", vec![Arg::U64(pf2), Arg::U64(po)]),
        ] {
            let args: Vec<Arg> = io
                .into_iter()
                .chain([Arg::U64(pc), Arg::U64(ps)])
                .chain(dims)
                .collect();
            g.launch(kernel, SMALL_GRID, &args).expect(kernel);
        }
        rounded(
            &format!("rope bf16, offset {off}, hd {hd}"),
            &back_bf16(&g, &b, off),
            &back(&g, &f, off),
        );
        rounded(
            &format!("rope f32 into bf16, offset {off}, hd {hd}"),
            &back_bf16(&g, &o, off),
            &back(&g, &f, off),
        );
    }
}

/// A RoPE table that does not fit the head dim (or has no rows, which the kernels' `row %
/// period` cannot take) is refused before any launch, naming the op.
#[test]
fn a_rope_table_that_does_not_fit_is_refused() {
    let g = CudaBackend::sim(1, BaseDtype::F32).unwrap();
    let mut x = g.buf(vec![1.0; 2 * 8]).unwrap();
    let table = |period: usize, n: usize| RopeTable {
        cos: g.buf(vec![1.0; n]).unwrap(),
        sin: g.buf(vec![0.0; n]).unwrap(),
        period,
    };
    let launches = g.stats().launches;
    for (t, what) in [
        (table(1, 3), "3 values, 4 wanted"),
        (table(0, 0), "no rows"),
    ] {
        let e = g.rope(&mut x, &t, 2, 1, 8, false).unwrap_err().to_string();
        assert!(e.contains("rope: a RoPE table of"), "{what}: {e}");
    }
    assert_eq!(g.stats().launches, launches, "nothing launched");
    g.rope(&mut x, &table(1, 4), 2, 1, 8, false).unwrap();
}
