//! The hand-written kernels: PTX compiled by build.rs from `kernels/*.cu`, embedded with
//! `include_str!` and loaded into the device once, lazily, per module. With
//! `LALORA_PTX_DIR=DIR` a module is read from `DIR/<module>.ptx` instead (kernel research:
//! edit the PTX, rerun, no rebuild); `selftest --write-ptx DIR` writes the embedded text.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::runtime::{Arg, LaunchConfig, PtxSource, Runtime};
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

pub static MODULES: &[KernelModule] = &[
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
            "dots_partial",
            "sq_accumulate",
        ],
    },
    KernelModule {
        name: "classifier",
        ptx: ptx!("classifier"),
        functions: &[
            "classifier_fold_f32",
            "classifier_fold_bf16",
            "classifier_draw",
            "classifier_finish_f32",
            "classifier_finish_bf16",
            "classifier_scatter_rows",
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
            "sq_grad_simt",
            "gram_simt",
            "mirror_upper",
            "segment_sum_f32",
            "segment_sum_bf16",
        ],
    },
    KernelModule {
        name: "curvature_tc",
        ptx: ptx!("curvature_tc"),
        functions: &[
            "gram_tf32_128x128_f32_f32",
            "gram_tf32_128x128_f32_bf16",
            "gram_tf32_128x128_bf16_f32",
            "gram_tf32_128x128_bf16_bf16",
            "gram_tf32_256x32_f32_f32",
            "gram_tf32_256x32_bf16_f32",
            "gram_3xtf32_128x128_f32_f32",
            "gram_3xtf32_256x32_f32_f32",
            "sq_grad_tf32_r8_f32_f32",
            "sq_grad_tf32_r8_bf16_f32",
            "sq_grad_tf32_r16_f32_f32",
            "sq_grad_tf32_r16_bf16_f32",
            "sq_grad_tf32_r32_f32_f32",
            "sq_grad_tf32_r32_bf16_f32",
            "sq_grad_tf32_r64_f32_f32",
            "sq_grad_tf32_r64_bf16_f32",
            "sq_grad_3xtf32_r8_f32_f32",
            "sq_grad_3xtf32_r16_f32_f32",
            "sq_grad_3xtf32_r32_f32_f32",
            "sq_grad_3xtf32_r64_f32_f32",
            "gram_reduce_splits",
        ],
    },
    KernelModule {
        name: "embedding",
        ptx: ptx!("embedding"),
        functions: &[
            "embedding_gather",
            "embedding_gather_f32",
            "gather_rows_bf16",
            "f32_to_bf16",
            "bf16_to_f32",
        ],
    },
    KernelModule {
        name: "flash_attention",
        ptx: ptx!("flash_attention"),
        functions: &[
            "flash_fwd_64",
            "flash_fwd_128",
            "flash_bwd_delta",
            "flash_bwd_dq_64",
            "flash_bwd_dq_128",
            "flash_bwd_dkdv_64",
            "flash_bwd_dkdv_128",
            "flash_fwd_64_bf16",
            "flash_fwd_128_bf16",
            "flash_bwd_delta_bf16",
            "flash_bwd_dq_64_bf16",
            "flash_bwd_dq_128_bf16",
            "flash_bwd_dkdv_64_bf16",
            "flash_bwd_dkdv_128_bf16",
        ],
    },
    KernelModule {
        name: "lora",
        ptx: ptx!("lora"),
        functions: &[
            "lora_forward_fused_f32",
            "lora_forward_fused_bf16",
            "lora_backward_rows",
            "lora_grad_chunk",
            "reduce_partials",
        ],
    },
    KernelModule {
        name: "lora_gemm",
        ptx: ptx!("lora_gemm"),
        functions: &["lora_gemm_nt", "lora_gemm_nn"],
    },
    KernelModule {
        name: "norm",
        ptx: ptx!("norm"),
        functions: &[
            "rmsnorm_forward_f32",
            "rmsnorm_forward_bf16",
            "add_rmsnorm_forward_f32",
            "add_rmsnorm_forward_bf16",
            "rmsnorm_backward",
        ],
    },
    KernelModule {
        name: "optim",
        ptx: ptx!("optim"),
        functions: &["adamw_step"],
    },
    KernelModule {
        name: "rope",
        ptx: ptx!("rope"),
        functions: &["rope", "rope_bf16"],
    },
    KernelModule {
        name: "swiglu",
        ptx: ptx!("swiglu"),
        functions: &[
            "swiglu_forward_f32",
            "swiglu_forward_bf16",
            "swiglu_forward_bf16_in",
            "swiglu_backward",
            "swiglu_backward_bf16_in",
            "swiglu_backward_bf16",
        ],
    },
];

/// Whether build.rs compiled the kernels into this binary.
pub const BUILT: bool = cfg!(lalora_cuda_kernels);

/// Where module PTX is read from: `LALORA_PTX_DIR`, if set.
pub fn ptx_dir() -> Option<PathBuf> {
    std::env::var_os("LALORA_PTX_DIR").map(PathBuf::from)
}

/// The modules as loaded into one device (one slot per entry of `MODULES`).
pub struct Kernels {
    rt: Arc<dyn Runtime>,
    dir: Option<PathBuf>,
    loaded: Vec<OnceLock<usize>>,
}

impl Kernels {
    pub fn new(rt: Arc<dyn Runtime>) -> Self {
        Kernels {
            rt,
            dir: ptx_dir(),
            loaded: MODULES.iter().map(|_| OnceLock::new()).collect(),
        }
    }

    /// The device's id of module `i`, loading it on first use.
    fn module(&self, i: usize) -> Result<usize> {
        if let Some(id) = self.loaded[i].get() {
            return Ok(*id);
        }
        let m = &MODULES[i];
        let (text, path) = match &self.dir {
            Some(dir) => {
                let path = dir.join(format!("{}.ptx", m.name));
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                (text, Some(path))
            }
            None => (m.ptx.to_string(), None),
        };
        let id = self.rt.load_module(&PtxSource {
            module: m.name,
            text: &text,
            path: path.as_deref(),
            entries: m.functions,
        })?;
        Ok(*self.loaded[i].get_or_init(|| id))
    }

    /// Launch entry `name` (loading its module on first use).
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let i = MODULES
            .iter()
            .position(|m| m.functions.contains(&name))
            .ok_or_else(|| Error::Device(format!("no kernel `{name}` is registered")))?;
        let id = self.module(i)?;
        self.rt.launch(id, name, cfg, args)
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
    #[cfg_attr(
        not(lalora_cuda_kernels),
        ignore = "built without CUDA kernels (no nvcc)"
    )]
    fn rust_kernel_names_equal_ptx_entries() {
        for m in MODULES {
            let mut want: Vec<String> = m.functions.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(entries(m.ptx), want, "module {}", m.name);
        }
        let mut files: Vec<&str> = option_env!("LALORA_KERNEL_FILES")
            .unwrap_or("")
            .split(',')
            .collect();
        let mut names: Vec<&str> = MODULES.iter().map(|m| m.name).collect();
        files.sort();
        names.sort();
        assert_eq!(
            files, names,
            "every kernels/*.cu is registered, and nothing else"
        );
    }

    /// The elementwise and row kernels move 128-bit packs (kernels/common.cuh): each of
    /// these entries loads (and, but for the dot product, stores) through `.v4` accesses.
    /// Every binary embeds all the PTX once (`MODULES` is a static: as a `const` it was
    /// inlined per use, and two binaries held it twice), and `scripts/gpu-check.sh
    /// --build-only` must fit five binaries in 56 MB to be carried to a GPU. With 3.81 MB
    /// of PTX they took 52.0 MB (2026-11-29), so about 0.8 MB more PTX would fill what is
    /// left; this budget fails first, here, rather than in a rare GPU session. (A budget
    /// on the PTX, not a measurement of the binaries: `--build-only` measures those.)
    #[test]
    #[cfg_attr(
        not(lalora_cuda_kernels),
        ignore = "built without CUDA kernels (no nvcc)"
    )]
    fn ptx_fits_the_gpu_check_budget() {
        const BUDGET: usize = 4_400_000;
        let total: usize = MODULES.iter().map(|m| m.ptx.len()).sum();
        let mut sizes: Vec<(usize, &str)> = MODULES.iter().map(|m| (m.ptx.len(), m.name)).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        assert!(
            total <= BUDGET,
            "the PTX takes {total} bytes, over the {BUDGET} that gpu-bin can carry five times \
             (largest: {sizes:?})"
        );
    }

    #[test]
    #[cfg_attr(
        not(lalora_cuda_kernels),
        ignore = "built without CUDA kernels (no nvcc)"
    )]
    fn elementwise_and_row_kernels_use_128_bit_accesses() {
        let (both, load): (&[&str], &[&str]) = (&["ld.global", "st.global"], &["ld.global"]);
        let packed = [
            ("norm", "rmsnorm_forward_f32", both),
            ("norm", "rmsnorm_forward_bf16", both),
            ("norm", "add_rmsnorm_forward_f32", both),
            ("norm", "add_rmsnorm_forward_bf16", both),
            ("norm", "rmsnorm_backward", both),
            ("blas1", "add_assign", both),
            ("blas1", "axpy", both),
            ("blas1", "scale", both),
            ("blas1", "mul_assign", both),
            ("blas1", "dot_partial", load),
            ("blas1", "sq_accumulate", both),
            ("swiglu", "swiglu_forward_f32", both),
            ("swiglu", "swiglu_forward_bf16", both),
            ("swiglu", "swiglu_forward_bf16_in", both),
            ("swiglu", "swiglu_backward", both),
            ("swiglu", "swiglu_backward_bf16_in", both),
            ("swiglu", "swiglu_backward_bf16", both),
            ("optim", "adamw_step", both),
            ("rope", "rope", both),
            ("rope", "rope_bf16", both),
            ("embedding", "embedding_gather", both),
            ("embedding", "embedding_gather_f32", both),
            ("embedding", "f32_to_bf16", both),
            ("embedding", "bf16_to_f32", both),
            ("embedding", "gather_rows_bf16", both),
            ("cross_entropy", "cross_entropy", both),
        ];
        for (module, entry, accesses) in packed {
            let ptx = MODULES
                .iter()
                .find(|m| m.name == module)
                .map(|m| m.ptx)
                .unwrap_or_default();
            let start = ptx
                .find(&format!(".entry {entry}("))
                .unwrap_or_else(|| panic!("{module} has no entry {entry}"));
            let body = &ptx[start..];
            let body = &body[..body.find("\n}\n").unwrap_or(body.len())];
            for access in accesses {
                assert!(
                    body.lines()
                        .any(|l| l.contains(access) && l.contains(".v4.")),
                    "{entry}: no 128-bit {access}"
                );
            }
        }
    }

    /// Every PTX file passes ptxas for sm_80 (A100) and sm_90 (H100/H200). ptxas sits
    /// beside $NVCC (scripts/install-nvcc.sh installs both).
    #[test]
    #[cfg_attr(
        not(lalora_cuda_kernels),
        ignore = "built without CUDA kernels (no nvcc)"
    )]
    fn ptx_passes_ptxas_for_sm80_and_sm90() {
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
