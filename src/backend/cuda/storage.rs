//! Buffers on the device (`Backend::to_host`, `weight`, `copy_into`, `slice`, `dup`): a
//! download widens bf16 exactly; base weights are uploaded in the engine's base dtype.

use half::bf16;

use super::runtime::DType;
use super::{Act, BaseDtype, CudaBackend, Weight};
use crate::error::{Error, Result};

impl CudaBackend {
    pub(super) fn to_host_impl(&self, x: &Act) -> Result<Vec<f32>> {
        match x {
            Act::F32(b) => self.download(b),
            // Widening is exact: the values the device holds, as f32.
            Act::Bf16(b) => Ok(self
                .download(b)?
                .into_iter()
                .map(|h| bf16::from_bits(h).to_f32())
                .collect()),
        }
    }

    pub(super) fn weight_impl(&self, host: Vec<f32>, _rows: usize, _cols: usize) -> Result<Weight> {
        Ok(match self.base {
            BaseDtype::Bf16 => {
                let b: Vec<u16> = host.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                Weight {
                    buf: self.upload(bytemuck::cast_slice::<u16, u8>(&b))?,
                    ty: DType::Bf16,
                }
            }
            BaseDtype::F32 => Weight {
                buf: self.upload(bytemuck::cast_slice::<f32, u8>(&host))?,
                ty: DType::F32,
            },
        })
    }

    pub(super) fn copy_into_impl(&self, dst: &mut Act, offset: usize, src: &Act) -> Result<()> {
        if offset + src.len() > dst.len() || src.dtype() != dst.dtype() {
            return Err(Error::Device(format!(
                "copy of {} {:?} elements at {offset} into a buffer of {} {:?}",
                src.len(),
                src.dtype(),
                dst.len(),
                dst.dtype()
            )));
        }
        let e = src.elem_bytes();
        self.rt
            .dtod(dst.addr() + (offset * e) as u64, src.addr(), src.len() * e)
    }

    pub(super) fn slice_impl(&self, src: &Act, offset: usize, len: usize) -> Result<Act> {
        if offset + len > src.len() {
            return Err(Error::Device(format!(
                "slice of {len} elements at {offset} from a buffer of {}",
                src.len()
            )));
        }
        let out = self.uninit_act(len, src.dtype())?;
        let e = src.elem_bytes();
        self.rt
            .dtod(out.addr(), src.addr() + (offset * e) as u64, len * e)?;
        Ok(out)
    }

    pub(super) fn dup_impl(&self, x: &Act) -> Result<Act> {
        let out = self.uninit_act(x.len(), x.dtype())?;
        self.rt
            .dtod(out.addr(), x.addr(), x.len() * x.elem_bytes())?;
        Ok(out)
    }
}
