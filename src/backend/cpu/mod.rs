//! The CPU backend: f32 everywhere, a blocked SIMD GEMM (`gemm` crate) on the rayon pool
//! (one band of rows per thread, `gemm::row_bands`; a projection group's whole forward
//! per band, `banded`), rayon over rows for everything else. It is the reference every CUDA kernel is tested
//! against, so each op here is written for clarity first and speed second.

pub mod attention;
mod banded;
pub mod classifier;
pub mod curvature;
pub mod gemm;
mod lowrank;
pub mod ops;
pub mod optim;
pub mod peak;
pub mod stored;
mod vmath;
pub mod weight;

use rayon::prelude::*;

use self::gemm::{Mat, gemm, gemm_new};
use self::weight::CpuWeight;
use super::group::{GradFeeds, LoraGroup, ProjBwd, ProjFwd, Projected};
use super::{
    AdamHyper, AttnSaved, AttnShape, Backend, CeTargets, ClassifierOut, DiagPenalty, LoraDims,
    RopeTable, Segment, unrotate_attention_grads,
};
use crate::error::Result;

/// The widest x86 vector extension the GEMM and the row ops use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Avx2,
    Below,
}

/// AVX-512 needs both the CPU and the `avx512` feature (on by default; off, an AVX-512
/// machine runs the AVX2 kernels, as an AVX2-only machine would).
pub fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
        {
            return Simd::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Simd::Avx2;
        }
    }
    Simd::Below
}

/// [`simd`] in words, for the benchmarks' reports.
pub fn simd_level() -> &'static str {
    match simd() {
        Simd::Avx512 => "AVX-512",
        Simd::Avx2 => "AVX2",
        Simd::Below => "below AVX2",
    }
}

/// Row counts up to which `linear` takes [`gemm::linear_few_rows`] (measured on SmolLM2's
/// shapes, 2 threads: see the function), or [`gemm::linear_few_rows_t`] for a weight
/// stored transposed (taken at the same counts; measured up to 8 rows only).
const FEW_ROWS: usize = 64;

pub struct CpuBackend {
    threads: usize,
}

impl CpuBackend {
    /// Uses the global rayon pool; `threads = 0` keeps rayon's default (all cores).
    pub fn new(threads: usize) -> Self {
        // Fails only if the pool was already built (e.g. by an earlier backend in the same
        // process), in which case that pool is used. Commands run on its threads
        // (`device::run_on`), so they get the main thread's stack size.
        // Before the pool's threads start: a thread takes its malloc arena at its first
        // allocation and keeps it.
        keep_freed_memory();
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .stack_size(8 << 20)
            .build_global();
        CpuBackend {
            threads: rayon::current_num_threads(),
        }
    }

    /// `project_group` op by op: the base products one by one, then the low-rank parts of
    /// the whole group at once (`lowrank::group_forward`: one pass over `x` for every `u`),
    /// then RoPE.
    pub(crate) fn project_group_by_op(
        &self,
        x: &Vec<f32>,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Vec<f32>>>> {
        let mut ys = projs
            .iter()
            .map(|p| self.linear(x, p.w, m, d_in, p.d_out))
            .collect::<Result<Vec<_>>>()?;
        let parts = projs
            .iter()
            .zip(ys.iter_mut())
            .filter_map(|(p, y)| p.lora.map(|(a, b)| lowrank::FwdPart { a, b, y }))
            .collect();
        let mut us = lowrank::group_forward(x, m, d_in, lora.r, lora.scale, parts).into_iter();
        projs
            .iter()
            .zip(ys)
            .map(|(p, mut y)| {
                if let Some(r) = p.rope {
                    self.rope(&mut y, r.table, m, r.n_heads, r.head_dim, false)?;
                }
                Ok((y, p.lora.and_then(|_| us.next())))
            })
            .collect()
    }
}

/// glibc serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB)
/// with fresh mappings and unmaps them on free, so every training step would fault its
/// activations (GBs) in again. Serve them from the heap and never trim it, so freed
/// buffers are reused while resident (`cost::Meter` trims once per stage, for its figures).
///
/// Commands run on a pool thread. A thread with an arena of its own gets a chain of 64 MiB
/// heaps, which glibc unmaps as each empties unless the top pad exceeds a heap (the trim
/// threshold does not apply): a training step on SmolLM2 faulted 200 MB back in each time,
/// 50,000 page faults. Hence a pad above 64 MiB (address space only; under strict
/// overcommit it is reserved). Such an arena still maps a single request above 64 MiB on
/// its own; the model's buffers are far smaller. New threads share one arena where glibc
/// lets them (it may hand a thread another existing arena), which also drops the free
/// memory duplicated across per-thread arenas: peak RSS 2.4-2.5 GB -> 1.9 GB in training.
/// Measured on 2 threads; with many, large allocations would queue on one lock.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator's policy.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // Virtual address space only: the pad's pages are not touched until used.
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;

    fn describe(&self) -> String {
        format!("cpu ({} threads, {})", self.threads, simd_level())
    }

    fn buf(&self, host: Vec<f32>) -> Result<Vec<f32>> {
        Ok(host)
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn take_host(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }

    fn to_host(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn weight(&self, host: Vec<f32>, rows: usize, cols: usize) -> Result<CpuWeight> {
        if host.len() != rows * cols {
            return Err(crate::error::Error::Device(format!(
                "weight of {} values given as {rows} x {cols}",
                host.len()
            )));
        }
        Ok(CpuWeight::new(host, rows, cols))
    }

    fn weight_stored(
        &self,
        host: Vec<f32>,
        stored: crate::model::quant::StoredMatrix,
        rows: usize,
        cols: usize,
    ) -> Result<CpuWeight> {
        if stored.dims() != (rows, cols) {
            return Err(crate::error::Error::Device(format!(
                "stored form of {:?} given for a {rows} x {cols} weight",
                stored.dims()
            )));
        }
        let w = self.weight(host, rows, cols)?;
        Ok(
            match stored::compact(stored, w.transposed_values().is_some()) {
                Some(c) => w.with_compact(c),
                None => w,
            },
        )
    }

    fn copy_into(&self, dst: &mut Vec<f32>, offset: usize, src: &Vec<f32>) -> Result<()> {
        dst[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn slice(&self, src: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        src.get(offset..offset + len)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| {
                crate::error::Error::Device(format!(
                    "slice of {len} elements at {offset} from a buffer of {}",
                    src.len()
                ))
            })
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32], dim: usize) -> Result<Vec<f32>> {
        Ok(ops::embedding(&table.row_major_values(), ids, dim))
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        _rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(ops::rmsnorm(x, w, dim, eps))
    }

    fn add_rmsnorm(
        &self,
        h: &mut Vec<f32>,
        delta: &Vec<f32>,
        w: &Vec<f32>,
        _rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(ops::add_rmsnorm(h, delta, w, dim, eps))
    }

    fn rmsnorm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        _rows: usize,
        dim: usize,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        ops::rmsnorm_backward(dy, x, w, rstd, dim, dx);
        Ok(())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Vec<f32>> {
        debug_assert_eq!(w.dims(), (n, k), "linear: W is not (n, k)");
        // The file's compact form, where the weight has one, in the products that stream it.
        if (1..=gemm::STREAM_ROWS).contains(&m) && k > 0 {
            match w.compact() {
                Some(stored::Compact::Rows { s, dots }) => {
                    return Ok(stored::linear_few_rows(x, s, *dots, m, k, n));
                }
                Some(stored::Compact::Columns(t)) => {
                    return Ok(stored::linear_few_rows_t(x, t, m, k, n));
                }
                None => {}
            }
        }
        if m <= FEW_ROWS {
            return Ok(match w.transposed_values() {
                Some(wt) => gemm::linear_few_rows_t(x, wt, m, k, n),
                None => gemm::linear_few_rows(x, &w.row_major_values(), m, k, n),
            });
        }
        Ok(gemm_new(m, n, k, Mat::rows(x, k), w.wt(), 1.0, true))
    }

    fn linear_backward(
        &self,
        dy: &Vec<f32>,
        w: &CpuWeight,
        m: usize,
        k: usize,
        n: usize,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        debug_assert_eq!(w.dims(), (n, k), "linear_backward: W is not (n, k)");
        gemm(
            m,
            k,
            n,
            dx,
            k,
            accumulate,
            Mat::rows(dy, n),
            w.w(),
            1.0,
            true,
        );
        Ok(())
    }

    fn lora_forward(
        &self,
        x: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        d: LoraDims,
        y: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let part = lowrank::FwdPart { a, b, y };
        let mut u = lowrank::group_forward(x, d.m, d.d_in, d.r, d.scale, vec![part]);
        Ok(u.remove(0))
    }

    fn lora_backward(
        &self,
        g: &Vec<f32>,
        x: &Vec<f32>,
        u: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        d: LoraDims,
        dx: &mut Vec<f32>,
        grads: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
    ) -> Result<Vec<f32>> {
        let grads = grads.map(|(da, db)| (&mut da[..], &mut db[..]));
        let part = lowrank::BwdPart { g, a, b, u, grads };
        let mut ga = lowrank::group_backward(x, d.m, d.d_in, d.r, d.scale, dx, vec![part]);
        Ok(ga.remove(0))
    }

    /// Enough rows for `gemm::row_bands`: a band of rows per thread, each band's whole
    /// group in one task (`banded::group_forward`); fewer, op by op
    /// ([`CpuBackend::project_group_by_op`]). The same bits either way.
    fn project_group(
        &self,
        x: &Vec<f32>,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: &[ProjFwd<'_, Self>],
    ) -> Result<Vec<Projected<Vec<f32>>>> {
        let narrowest = projs.iter().map(|p| p.d_out).min().unwrap_or(0);
        if let Some(bands) = gemm::row_bands(m, narrowest, rayon::current_num_threads()) {
            return Ok(banded::group_forward(x, m, d_in, lora, projs, &bands));
        }
        self.project_group_by_op(x, m, d_in, lora, projs)
    }

    /// The base products one by one into `dx`, then the low-rank parts of the whole group
    /// at once (`lowrank::group_backward`: one pass over `dx` and one over `x`).
    fn project_group_backward(
        &self,
        x: &Vec<f32>,
        m: usize,
        d_in: usize,
        lora: LoraGroup,
        projs: Vec<ProjBwd<'_, Self>>,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        for (i, p) in projs.iter().enumerate() {
            self.linear_backward(p.g, p.w, m, d_in, p.d_out, dx, accumulate || i > 0)?;
        }
        let adapted: Vec<bool> = projs.iter().map(|p| p.lora.is_some()).collect();
        let parts = projs
            .into_iter()
            .filter_map(|p| {
                let g = p.g;
                p.lora.map(|l| lowrank::BwdPart {
                    g,
                    a: l.a,
                    b: l.b,
                    u: l.u,
                    grads: l.grads.map(|(da, db)| (&mut da[..], &mut db[..])),
                })
            })
            .collect();
        let mut ga = lowrank::group_backward(x, m, d_in, lora.r, lora.scale, dx, parts).into_iter();
        Ok(adapted
            .into_iter()
            .map(|a| if a { ga.next() } else { None })
            .collect())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        t: &RopeTable<Vec<f32>>,
        _rows: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(x, &t.cos, &t.sin, t.period, n_heads, head_dim, inverse);
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: &AttnShape,
    ) -> Result<(Vec<f32>, AttnSaved<Vec<f32>>)> {
        let (out, probs) = attention::attention(q, k, v, s);
        Ok((out, AttnSaved::Probs(probs)))
    }

    fn attention_out(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: &AttnShape,
    ) -> Result<Vec<f32>> {
        Ok(attention::attention_out(q, k, v, s))
    }

    fn attention_backward(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        _out: &Vec<f32>,
        saved: &AttnSaved<Vec<f32>>,
        rope: Option<&RopeTable<Vec<f32>>>,
        _feeds: GradFeeds,
        s: &AttnShape,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let probs = saved.probs("cpu")?;
        let (mut dq, mut dk, dv) = attention::attention_backward(dout, q, k, v, probs, s);
        if let Some(rope) = rope {
            unrotate_attention_grads(self, &mut dq, &mut dk, rope, s)?;
        }
        Ok((dq, dk, dv))
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(ops::swiglu(gate, up))
    }

    fn swiglu_backward(
        &self,
        dact: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        _feeds: GradFeeds,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(ops::swiglu_backward(dact, gate, up))
    }

    fn add_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        use rayon::prelude::*;
        a.par_iter_mut()
            .zip(b.par_iter())
            .for_each(|(x, y)| *x += y);
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &Vec<f32>,
        _rows: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        Ok(ops::cross_entropy(logits, vocab, targets, grad_scale))
    }

    fn classifier(
        &self,
        hidden: &Vec<f32>,
        head: &CpuWeight,
        _rows: usize,
        dim: usize,
        vocab: usize,
        targets: CeTargets<'_>,
        grad_scale: Option<f32>,
    ) -> Result<ClassifierOut<Vec<f32>>> {
        Ok(classifier::classifier(
            hidden,
            &head.row_major_values(),
            dim,
            vocab,
            targets,
            grad_scale,
        ))
    }

    fn gram_accumulate(
        &self,
        x: &Vec<f32>,
        dx: usize,
        y: &Vec<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        curvature::gram_accumulate(x, dx, y, dy, segments, alpha, out);
        Ok(())
    }

    fn gram_accumulate_upper(
        &self,
        x: &Vec<f32>,
        d: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        curvature::gram_accumulate_upper(x, d, segments, alpha, out);
        Ok(())
    }

    fn mirror_upper(&self, out: &mut Vec<f32>, n: usize) -> Result<()> {
        curvature::mirror_upper(out, n);
        Ok(())
    }

    fn segment_sum(
        &self,
        x: &Vec<f32>,
        dim: usize,
        segments: &[Segment],
        mean: bool,
    ) -> Result<Vec<f32>> {
        Ok(curvature::segment_sum(x, dim, segments, mean))
    }

    fn sq_grad_accumulate(
        &self,
        g: &Vec<f32>,
        dg: usize,
        y: &Vec<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        curvature::sq_grad_accumulate(g, dg, y, dy, segments, alpha, out);
        Ok(())
    }

    fn matmul(
        &self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
    ) -> Result<Vec<f32>> {
        let av = if ta {
            Mat::rows(a, m).t()
        } else {
            Mat::rows(a, k)
        };
        let bv = if tb {
            Mat::rows(b, k).t()
        } else {
            Mat::rows(b, n)
        };
        Ok(gemm_new(m, n, k, av, bv, 1.0, true))
    }

    fn dup(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn mul_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) -> Result<()> {
        a.iter_mut().zip(b).for_each(|(x, y)| *x *= y);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, k: f32) -> Result<()> {
        x.iter_mut().for_each(|v| *v *= k);
        Ok(())
    }

    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
        Ok(())
    }

    fn dot(&self, x: &Vec<f32>, y: &Vec<f32>) -> Result<f64> {
        Ok(x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum())
    }

    /// Each pair's [`dot`](Backend::dot), the pairs spread over the pool: the same sums, so
    /// the same numbers as one after another. Why: a step's norms and finiteness checks
    /// are about 420 dots over 2.4M values (SmolLM2, r = 8 on all seven projections),
    /// each a chain of dependent f64 adds that one core runs at about one add per
    /// latency; done in turn they took 6.5 ms a call with the other cores idle.
    fn dots(&self, pairs: &[(&Vec<f32>, &Vec<f32>)]) -> Result<Vec<f64>> {
        pairs.par_iter().map(|(x, y)| self.dot(x, y)).collect()
    }

    fn adamw_step(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        h: &AdamHyper,
        grad_scale: f32,
        penalty: Option<DiagPenalty<'_, Self>>,
    ) -> Result<()> {
        let pen = penalty
            .as_ref()
            .map(|d| (d.mean.as_slice(), d.precision.as_slice(), d.lambda));
        optim::adamw_step(p, g, m, v, h, grad_scale, pen);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dots` over the pool gives each pair's sequential `dot`, bit for bit: the training
    /// step's norms (and so its clipping) do not depend on the pool's size.
    #[test]
    fn dots_are_each_pairs_dot() {
        let val = |i: usize, s: usize| ((i * s % 1009) as f32 - 504.0) / 7.0;
        let vecs: Vec<(Vec<f32>, Vec<f32>)> = [0usize, 1, 17, 1000, 4099]
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let x = (0..n).map(|i| val(i, 7919 + k)).collect();
                let y = (0..n).map(|i| val(i, 104729 + k)).collect();
                (x, y)
            })
            .collect();
        let pairs: Vec<(&Vec<f32>, &Vec<f32>)> = vecs.iter().map(|(x, y)| (x, y)).collect();
        let be = CpuBackend::new(2);
        let want: Vec<u64> = pairs
            .iter()
            .map(|(x, y)| be.dot(x, y).unwrap().to_bits())
            .collect();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got: Vec<u64> = pool
                .install(|| be.dots(&pairs))
                .unwrap()
                .iter()
                .map(|d| d.to_bits())
                .collect();
            assert_eq!(got, want, "{threads} threads");
        }
    }
}
