//! The hand-written kernels: PTX compiled by build.rs from `kernels/*.cu`, embedded with
//! `include_str!` and loaded into the context once, lazily, per module.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};

use crate::error::{Error, Result};

/// One `.cu` file: its PTX and the entry points the Rust side launches.
pub struct KernelModule {
    pub name: &'static str,
    pub ptx: &'static str,
    pub functions: &'static [&'static str],
}

macro_rules! ptx {
    ($file:literal) => {{
        #[cfg(lalora_cuda_kernels)]
        {
            include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx"))
        }
        #[cfg(not(lalora_cuda_kernels))]
        {
            ""
        }
    }};
}

pub const MODULES: &[KernelModule] = &[
    KernelModule {
        name: "attention",
        ptx: ptx!("attention"),
        functions: &["attn_softmax_forward", "attn_softmax_backward"],
    },
    KernelModule {
        name: "blas1",
        ptx: ptx!("blas1"),
        functions: &[
            "add_assign",
            "axpy",
            "scale",
            "mul_assign",
            "dot_partial",
            "sq_accumulate",
        ],
    },
    KernelModule {
        name: "cross_entropy",
        ptx: ptx!("cross_entropy"),
        functions: &["cross_entropy"],
    },
    KernelModule {
        name: "curvature",
        ptx: ptx!("curvature"),
        functions: &[
            "sq_grad_accumulate",
            "gram_accumulate",
            "mirror_upper",
            "segment_sum",
        ],
    },
    KernelModule {
        name: "embedding",
        ptx: ptx!("embedding"),
        functions: &["embedding_gather", "f32_to_bf16"],
    },
    KernelModule {
        name: "lora",
        ptx: ptx!("lora"),
        functions: &[
            "lora_forward_fused",
            "lora_backward_rows",
            "lora_grad_chunk",
            "reduce_partials",
        ],
    },
    KernelModule {
        name: "norm",
        ptx: ptx!("norm"),
        functions: &["rmsnorm_forward", "rmsnorm_backward"],
    },
    KernelModule {
        name: "optim",
        ptx: ptx!("optim"),
        functions: &["adamw_step"],
    },
    KernelModule {
        name: "rope",
        ptx: ptx!("rope"),
        functions: &["rope"],
    },
    KernelModule {
        name: "swiglu",
        ptx: ptx!("swiglu"),
        functions: &["swiglu_forward", "swiglu_backward"],
    },
];

/// Whether build.rs compiled the kernels into this binary.
pub const BUILT: bool = cfg!(lalora_cuda_kernels);

/// Loaded modules (one slot per entry of `MODULES`) and their looked-up entry points (one
/// slot per function, in `MODULES` order).
pub struct Kernels {
    ctx: Arc<CudaContext>,
    loaded: Vec<OnceLock<Arc<CudaModule>>>,
    functions: Vec<OnceLock<CudaFunction>>,
}

impl Kernels {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        Kernels {
            ctx,
            loaded: MODULES.iter().map(|_| OnceLock::new()).collect(),
            functions: MODULES
                .iter()
                .flat_map(|m| m.functions)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// The named entry point, loading its module and looking it up on first use only.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let (i, slot) = MODULES
            .iter()
            .enumerate()
            .flat_map(|(i, m)| m.functions.iter().map(move |f| (i, *f)))
            .enumerate()
            .find(|(_, (_, f))| *f == name)
            .map(|(slot, (i, _))| (i, slot))
            .ok_or_else(|| Error::Cuda(format!("no kernel `{name}`")))?;
        if let Some(f) = self.functions[slot].get() {
            return Ok(f.clone());
        }
        let module = match self.loaded[i].get() {
            Some(m) => m.clone(),
            None => {
                let m = self
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(MODULES[i].ptx))
                    .map_err(|e| load_error(MODULES[i].name, e))?;
                self.loaded[i].get_or_init(|| m).clone()
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| Error::Cuda(format!("kernel `{name}`: {e}")))?;
        Ok(self.functions[slot].get_or_init(|| f).clone())
    }
}

fn load_error(module: &str, e: cudarc::driver::DriverError) -> Error {
    let text = e.to_string();
    if text.contains("UNSUPPORTED_PTX_VERSION") || text.contains("INVALID_PTX") {
        Error::Cuda(format!(
            "the NVIDIA driver is older than the kernels' PTX needs (module `{module}`, PTX ISA 9.0 from CUDA 13.0): update the driver to 580 or newer ({text})"
        ))
    } else {
        Error::Cuda(format!("loading kernel module `{module}`: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.entry` names in a PTX text.
    fn entries(ptx: &str) -> Vec<String> {
        let mut v: Vec<String> = ptx
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or("").trim().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rust_kernel_names_equal_ptx_entries() {
        if !BUILT {
            eprintln!("skipped: built without CUDA kernels (no nvcc)");
            return;
        }
        for m in MODULES {
            let mut want: Vec<String> = m.functions.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(entries(m.ptx), want, "module {}", m.name);
        }
        let files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                e.path()
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .filter(|_| e.path().extension().is_some_and(|x| x == "cu"))
            })
            .collect();
        assert_eq!(
            files.len(),
            MODULES.len(),
            "every kernels/*.cu is registered"
        );
    }

    /// Every PTX file passes ptxas for sm_80 (A100) and sm_90 (H100/H200). ptxas sits
    /// beside $NVCC (scripts/install-nvcc.sh installs both).
    #[test]
    fn ptx_passes_ptxas_for_sm80_and_sm90() {
        if !BUILT {
            eprintln!("skipped: built without CUDA kernels (no nvcc)");
            return;
        }
        // $NVCC, the nvcc that built the kernels, or the one on PATH: ptxas sits beside it.
        let on_path = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("nvcc"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let ptxas = std::env::var_os("NVCC")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain(option_env!("LALORA_BUILD_NVCC").map(std::path::PathBuf::from))
            .chain(on_path)
            .map(|n| n.with_file_name("ptxas"))
            .find(|p| p.exists())
            .expect("no ptxas: set NVCC to an nvcc with ptxas beside it (scripts/install-nvcc.sh)");
        let dir = tempfile::tempdir().unwrap();
        for m in MODULES {
            let path = dir.path().join(format!("{}.ptx", m.name));
            std::fs::write(&path, m.ptx).unwrap();
            for arch in ["sm_80", "sm_90"] {
                let out = std::process::Command::new(&ptxas)
                    .arg(format!("-arch={arch}"))
                    .arg("-o")
                    .arg(dir.path().join("out.cubin"))
                    .arg(&path)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "ptxas -arch={arch} {}: {}",
                    m.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
