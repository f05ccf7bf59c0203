//! Vector ops over f32 buffers (`kernels/blas1.cu`, `kernels/optim.cu`): in-place
//! arithmetic, dot products reduced in f64 in a fixed order (one launch and one readback
//! for a whole list in `dots`), and the AdamW step with the Laplace penalty.

use super::runtime::{Arg, LaunchConfig};
use super::{Act, CudaBackend, THREADS};
use crate::backend::{AdamHyper, DiagPenalty};
use crate::error::{Error, Result};

impl CudaBackend {
    pub(super) fn add_assign_impl(&self, a: &mut Act, b: &Act) -> Result<()> {
        let n = a.len();
        self.launch(
            "add_assign",
            Self::packed(n, 4),
            &[
                Arg::U64(a.f32_mut()?.ptr()),
                Arg::U64(b.f32()?.ptr()),
                Arg::U64(n as u64),
            ],
        )
    }

    pub(super) fn mul_assign_impl(&self, a: &mut Act, b: &Act) -> Result<()> {
        let n = a.len();
        self.launch(
            "mul_assign",
            Self::packed(n, 4),
            &[
                Arg::U64(a.f32_mut()?.ptr()),
                Arg::U64(b.f32()?.ptr()),
                Arg::U64(n as u64),
            ],
        )
    }

    pub(super) fn scale_impl(&self, x: &mut Act, k: f32) -> Result<()> {
        let n = x.len();
        self.launch(
            "scale",
            Self::packed(n, 4),
            &[
                Arg::U64(x.f32_mut()?.ptr()),
                Arg::F32(k),
                Arg::U64(n as u64),
            ],
        )
    }

    pub(super) fn axpy_impl(&self, alpha: f32, x: &Act, y: &mut Act) -> Result<()> {
        let n = x.len();
        self.launch(
            "axpy",
            Self::packed(n, 4),
            &[
                Arg::F32(alpha),
                Arg::U64(x.f32()?.ptr()),
                Arg::U64(y.f32_mut()?.ptr()),
                Arg::U64(n as u64),
            ],
        )
    }

    pub(super) fn dot_impl(&self, x: &Act, y: &Act) -> Result<f64> {
        let n = x.len();
        if n == 0 {
            return Ok(0.0);
        }
        let cfg = Self::packed(n, 4);
        let partial = self.uninit::<f64>(cfg.grid[0] as usize)?;
        self.launch(
            "dot_partial",
            cfg,
            &[
                Arg::U64(x.f32()?.ptr()),
                Arg::U64(y.f32()?.ptr()),
                Arg::U64(partial.ptr()),
                Arg::U64(n as u64),
            ],
        )?;
        Ok(self.download(&partial)?.iter().sum())
    }

    pub(super) fn dots_impl(&self, pairs: &[(&Act, &Act)]) -> Result<Vec<f64>> {
        let longest = pairs.iter().map(|(x, _)| x.len()).max().unwrap_or(0);
        if longest == 0 {
            return Ok(vec![0.0; pairs.len()]);
        }
        for (x, y) in pairs {
            // The table below holds f32 addresses: check each is one.
            x.f32()?;
            y.f32()?;
            if x.len() != y.len() {
                return Err(Error::Device(format!(
                    "dot product of buffers of {} and {} elements",
                    x.len(),
                    y.len()
                )));
            }
        }
        // Chunks per pair: enough blocks to cover the longest buffer once, but no more than
        // `dot`'s 4096 blocks in all unless there are more pairs than that.
        let chunks = longest
            .div_ceil(THREADS as usize)
            .min((4096 / pairs.len()).max(1));
        let k = pairs.len();
        let mut table = Vec::with_capacity(3 * k);
        table.extend(pairs.iter().map(|(x, _)| x.addr()));
        table.extend(pairs.iter().map(|(_, y)| y.addr()));
        table.extend(pairs.iter().map(|(x, _)| x.len() as u64));
        let table = self.upload(&table)?;
        let partial = self.uninit::<f64>(k * chunks)?;
        let cfg = LaunchConfig {
            grid: [k as u32, chunks as u32, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        self.launch(
            "dots_partial",
            cfg,
            &[
                Arg::U64(table.ptr()),
                Arg::I32(k as i32),
                Arg::U64(partial.ptr()),
            ],
        )?;
        Ok(self
            .download(&partial)?
            .chunks(chunks)
            .map(|c| c.iter().sum())
            .collect())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw_step_impl(
        &self,
        p: &mut Act,
        g: &Act,
        m: &mut Act,
        v: &mut Act,
        h: &AdamHyper,
        grad_scale: f32,
        penalty: Option<DiagPenalty<'_, CudaBackend>>,
    ) -> Result<()> {
        let n = p.len();
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2 = 1.0 - h.beta2.powi(h.step as i32);
        let (mean, prec, lambda, on) = match &penalty {
            Some(d) => (
                d.mean.f32()?.ptr(),
                d.precision.f32()?.ptr(),
                d.lambda,
                1i32,
            ),
            None => (g.f32()?.ptr(), g.f32()?.ptr(), 0.0, 0i32),
        };
        let args = [
            Arg::U64(p.f32_mut()?.ptr()),
            Arg::U64(g.f32()?.ptr()),
            Arg::U64(m.f32_mut()?.ptr()),
            Arg::U64(v.f32_mut()?.ptr()),
            Arg::U64(n as u64),
            Arg::F32(h.lr),
            Arg::F32(h.beta1),
            Arg::F32(h.beta2),
            Arg::F32(h.eps),
            Arg::F32(h.weight_decay),
            Arg::F32(bc1),
            Arg::F32(bc2),
            Arg::F32(grad_scale),
            Arg::U64(mean),
            Arg::U64(prec),
            Arg::F32(lambda),
            Arg::I32(on),
        ];
        self.launch("adamw_step", Self::packed(n, 4), &args)
    }
}
