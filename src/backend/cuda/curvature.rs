//! Curvature primitives on CUDA: KFAC factor (Gram) accumulation and per-sample gradient
//! squaring for `diag`, launching the kernels of `curvature.cu`.

use super::runtime::{Arg, LaunchConfig};
use super::{CudaBackend, DevBuf, MAX_RANK, THREADS};
use crate::backend::Segment;
use crate::error::{Error, Result};

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gram_accumulate_impl(
        &self,
        x: &DevBuf<f32>,
        dx: usize,
        y: &DevBuf<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut DevBuf<f32>,
    ) -> Result<()> {
        let symmetric = x.ptr() == y.ptr() && dx == dy;
        let mut merged: Vec<Segment> = Vec::new();
        for s in segments.iter().filter(|s| s.len > 0) {
            match merged.last_mut() {
                Some(l) if l.start + l.len == s.start => l.len += s.len,
                _ => merged.push(*s),
            }
        }
        let cfg = LaunchConfig {
            grid: [dy.div_ceil(64) as u32, dx.div_ceil(64) as u32, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        for s in merged {
            let args = [
                Arg::U64(x.ptr()),
                Arg::U64(y.ptr()),
                Arg::U64(out.ptr()),
                Arg::I32(s.start as i32),
                Arg::I32(s.len as i32),
                Arg::I32(dx as i32),
                Arg::I32(dy as i32),
                Arg::F32(alpha),
                Arg::I32(symmetric as i32),
            ];
            self.launch("gram_accumulate", cfg, &args)?;
        }
        if symmetric {
            self.launch(
                "mirror_upper",
                Self::elementwise(dx * dx),
                &[Arg::U64(out.ptr()), Arg::I32(dx as i32)],
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn sq_grad_accumulate_impl(
        &self,
        g: &DevBuf<f32>,
        dg: usize,
        y: &DevBuf<f32>,
        dy: usize,
        segments: &[Segment],
        alpha: f32,
        out: &mut DevBuf<f32>,
    ) -> Result<()> {
        // The rank-sized side stays in registers; the other side gets one thread per column.
        let (narrow, wide, r, wide_dim, narrow_first) = if dg <= MAX_RANK && dg <= dy {
            (g, y, dg, dy, 1i32)
        } else if dy <= MAX_RANK {
            (y, g, dy, dg, 0i32)
        } else {
            return Err(Error::Device(format!(
                "per-sample squaring needs one side <= {MAX_RANK} (got {dg} x {dy})"
            )));
        };
        let (st, ln) = self.segments(segments)?;
        let cfg = LaunchConfig {
            grid: [wide_dim.div_ceil(THREADS as usize) as u32, 1, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        let args = [
            Arg::U64(narrow.ptr()),
            Arg::U64(wide.ptr()),
            Arg::U64(st.ptr()),
            Arg::U64(ln.ptr()),
            Arg::I32(segments.len() as i32),
            Arg::I32(r as i32),
            Arg::I32(wide_dim as i32),
            Arg::F32(alpha),
            Arg::I32(narrow_first),
            Arg::U64(out.ptr()),
        ];
        self.launch("sq_grad_accumulate", cfg, &args)
    }
}
