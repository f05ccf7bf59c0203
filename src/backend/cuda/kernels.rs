//! The hand-written kernels: PTX compiled by build.rs from `kernels/*.cu`, embedded
//! deflated with `include_bytes!`, inflated and loaded into the device once, lazily, per
//! module. With
//! `LALORA_PTX_DIR=DIR` a module is read from `DIR/<module>.ptx` instead (kernel research:
//! edit the PTX, rerun, no rebuild); `selftest --write-ptx DIR` writes the embedded text.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::runtime::{Arg, LaunchConfig, PtxSource, Runtime};
use crate::error::{Error, Result};

/// One `.cu` file: its PTX and the entry points the Rust side launches.
pub struct KernelModule {
    pub name: &'static str,
    /// The PTX as build.rs deflated it (empty in a build without nvcc).
    deflated: &'static [u8],
    text: OnceLock<String>,
    pub functions: &'static [&'static str],
}

impl KernelModule {
    /// The PTX text, inflated on first use ("" in a build without nvcc).
    pub fn ptx(&self) -> &str {
        self.text.get_or_init(|| {
            if self.deflated.is_empty() {
                return String::new();
            }
            // build.rs wrote these bytes from nvcc's UTF-8 text; anything else is a broken build.
            let bytes =
                miniz_oxide::inflate::decompress_to_vec(self.deflated).unwrap_or_else(|e| {
                    panic!("the embedded PTX of {} does not inflate: {e:?}", self.name)
                });
            String::from_utf8(bytes)
                .unwrap_or_else(|e| panic!("the embedded PTX of {} is not UTF-8: {e}", self.name))
        })
    }

    /// The bytes a binary holds for this module's PTX (deflated).
    pub fn embedded_bytes(&self) -> usize {
        self.deflated.len()
    }
}

macro_rules! ptx {
    ($file:literal) => {{
        #[cfg(lalora_cuda_kernels)]
        {
            include_bytes!(concat!(env!("OUT_DIR"), "/", $file, ".ptx.deflate"))
        }
        #[cfg(not(lalora_cuda_kernels))]
        {
            &[]
        }
    }};
}

pub static MODULES: [KernelModule; 15] = [
    KernelModule {
        name: "attention",
        deflated: ptx!("attention"),
        text: OnceLock::new(),
        functions: &["attn_softmax_forward", "attn_softmax_backward"],
    },
    KernelModule {
        name: "blas1",
        deflated: ptx!("blas1"),
        text: OnceLock::new(),
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
        deflated: ptx!("classifier"),
        text: OnceLock::new(),
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
        deflated: ptx!("cross_entropy"),
        text: OnceLock::new(),
        functions: &["cross_entropy"],
    },
    KernelModule {
        name: "curvature",
        deflated: ptx!("curvature"),
        text: OnceLock::new(),
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
        deflated: ptx!("curvature_tc"),
        text: OnceLock::new(),
        functions: &[
            "gram_tf32_128x128_f32_f32",
            "gram_tf32_128x128_f32_bf16",
            "gram_tf32_128x128_bf16_f32",
            "gram_bf16_128x128_bf16_bf16",
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
        deflated: ptx!("embedding"),
        text: OnceLock::new(),
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
        deflated: ptx!("flash_attention"),
        text: OnceLock::new(),
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
        deflated: ptx!("lora"),
        text: OnceLock::new(),
        functions: &[
            "lora_forward_fused_f32",
            "lora_forward_fused_bf16",
            "lora_backward_rows",
            "lora_grad_chunk",
            "reduce_partials",
            "lora_split_pieces",
            "lora_sum_pieces",
        ],
    },
    KernelModule {
        name: "lora_gemm",
        deflated: ptx!("lora_gemm"),
        text: OnceLock::new(),
        functions: &["lora_gemm_nt", "lora_gemm_nn"],
    },
    KernelModule {
        name: "lora_gemm_tiles",
        deflated: ptx!("lora_gemm_tiles"),
        text: OnceLock::new(),
        functions: &super::lora_tiling::TILE_ENTRIES,
    },
    KernelModule {
        name: "norm",
        deflated: ptx!("norm"),
        text: OnceLock::new(),
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
        deflated: ptx!("optim"),
        text: OnceLock::new(),
        functions: &["adamw_step"],
    },
    KernelModule {
        name: "rope",
        deflated: ptx!("rope"),
        text: OnceLock::new(),
        functions: &["rope", "rope_bf16", "rope_f32_to_bf16"],
    },
    KernelModule {
        name: "swiglu",
        deflated: ptx!("swiglu"),
        text: OnceLock::new(),
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
            None => (m.ptx().to_string(), None),
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
        for m in MODULES.iter() {
            let mut want: Vec<String> = m.functions.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(entries(m.ptx()), want, "module {}", m.name);
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

    /// Every binary embeds all the PTX once, deflated (`MODULES` is a static: as a `const`
    /// it was inlined per use, and two binaries held it twice), and `scripts/gpu-check.sh
    /// --build-only` must fit five binaries in 56 MB to be carried to a GPU. With 1.17 MB
    /// of deflated PTX (7.3 MB of text) they took 39.3 MB (2026-11-30), so the embedded
    /// PTX may grow to about 4.4 MB; this budget fails first, here, rather than in a rare
    /// GPU session. (A budget on the embedded bytes, not a measurement of the binaries:
    /// `--build-only` measures those.)
    #[test]
    #[cfg_attr(
        not(lalora_cuda_kernels),
        ignore = "built without CUDA kernels (no nvcc)"
    )]
    fn ptx_fits_the_gpu_check_budget() {
        const BUDGET: usize = 4_400_000;
        let total: usize = MODULES.iter().map(|m| m.embedded_bytes()).sum();
        let mut sizes: Vec<(usize, &str)> = MODULES
            .iter()
            .map(|m| (m.embedded_bytes(), m.name))
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        assert!(
            total <= BUDGET,
            "the embedded PTX takes {total} bytes, over the {BUDGET} that gpu-bin can carry \
             five times (largest: {sizes:?})"
        );
    }

    /// The elementwise and row kernels move 128-bit packs (kernels/common.cuh): each of
    /// these entries loads (and, but for the dot product, stores) through `.v4` accesses.
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
            ("rope", "rope_f32_to_bf16", both),
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
                .map(|m| m.ptx())
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

    /// The entries `ptxas -v` reports spill stores or loads for, with the bytes stored.
    fn spilling_entries(log: &str) -> Vec<(String, u32)> {
        let mut entry = "";
        let mut out = Vec::new();
        for line in log.lines() {
            if let Some(e) = line.split("Function properties for ").nth(1) {
                entry = e.trim();
            } else if line.contains("spill stores")
                && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
            {
                let stored = line
                    .split(" bytes spill stores")
                    .next()
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(u32::MAX);
                out.push((entry.to_string(), stored));
            }
        }
        out
    }

    /// Spills allowed on sm_90, by entry, in bytes stored: each one read in the
    /// disassembly (nvdisasm, 2026-11-30) to lie outside the entry's loops. The bf16 flash
    /// forward runs at 128 registers (two blocks per SM) and keeps one 64-bit offset from
    /// its prologue to its epilogue in local memory: one store and two loads per thread.
    const SPILLS_ALLOWED: [(&str, u32); 1] = [("flash_fwd_64_bf16", 8)];

    #[test]
    fn spills_are_found_in_a_ptxas_log() {
        let log = "ptxas info    : Function properties for k1\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Function properties for k2\n    16 bytes stack frame, 16 bytes spill stores, 36 bytes spill loads\n";
        assert_eq!(spilling_entries(log), [("k2".to_string(), 16)]);
    }

    /// Every PTX file passes ptxas for sm_80 (A100) and sm_90 (H100/H200), and no entry the
    /// engine runs spills registers to local memory on sm_90 (ptxas -v) beyond
    /// `SPILLS_ALLOWED`: a spill inside a main loop costs more than any tiling gains. (lora_gemm_tiles.cu's 64 x 64 warp tiles
    /// spill a little; they are only timed beside the engine's, BENCHMARKS.md.) ptxas sits
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
        for m in MODULES.iter() {
            let path = dir.path().join(format!("{}.ptx", m.name));
            std::fs::write(&path, m.ptx()).unwrap();
            for arch in ["sm_80", "sm_90"] {
                let out = std::process::Command::new(&ptxas)
                    .arg(format!("-arch={arch}"))
                    .arg("-v")
                    .arg("-o")
                    .arg(dir.path().join("out.cubin"))
                    .arg(&path)
                    .output()
                    .unwrap();
                let log = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "ptxas -arch={arch} {}: {log}", m.name);
                if arch == "sm_90" && m.name != "lora_gemm_tiles" {
                    let spilling: Vec<(String, u32)> = spilling_entries(&log)
                        .into_iter()
                        .filter(|(e, bytes)| {
                            !SPILLS_ALLOWED.iter().any(|(a, max)| a == e && bytes <= max)
                        })
                        .collect();
                    assert!(
                        spilling.is_empty(),
                        "{}: spills on sm_90 (entry, bytes stored): {spilling:?}",
                        m.name
                    );
                }
            }
        }
    }
}
