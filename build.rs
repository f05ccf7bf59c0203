//! Compile every `kernels/*.cu` to PTX with nvcc (DESIGN §9).
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `$PATH`,
//! `/usr/local/cuda/bin`; `nvidia-smi` is never called. The target is `compute_80` PTX
//! (A100, H100, H200 through the driver's JIT) unless `LALORA_CUDA_ARCH` says otherwise.
//! Without nvcc the crate builds for the CPU with a warning, or fails when
//! `LALORA_REQUIRE_CUDA_KERNELS=1`. With the kernels built, `cfg(lalora_cuda_kernels)`
//! is set and the PTX lies in `OUT_DIR` for `include_str!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    let p = Path::new("/usr/local/cuda/bin/nvcc");
    p.exists().then(|| p.to_path_buf())
}

/// The PTX at `path` without nvcc's comment lines (chiefly a `// begin inline asm` and
/// `// end inline asm` around every `asm` statement): 5-7 % of its bytes, which every
/// binary embeds (`scripts/gpu-check.sh` carries five within a size limit). They mean
/// nothing to ptxas, the driver or the simulator; the rest is kept as nvcc wrote it.
fn compact(path: &Path) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if !line.trim_start().starts_with("//") {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// `<path>.deflate`: the PTX at `path` deflated, which is what the binaries embed (PTX
/// text deflates about sixfold, and `scripts/gpu-check.sh` carries five binaries within a
/// size limit); `KernelModule::ptx` inflates it on first use.
fn deflate(path: &Path) {
    let text =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let packed = miniz_oxide::deflate::compress_to_vec(&text, 9);
    let out = path.with_extension("ptx.deflate");
    std::fs::write(&out, packed).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lalora_cuda_kernels)");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "LALORA_CUDA_ARCH",
        "LALORA_REQUIRE_CUDA_KERNELS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let kernels = Path::new("kernels");
    println!("cargo::rerun-if-changed=kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        println!("cargo::rerun-if-changed={}", s.display());
    }
    let required = env::var("LALORA_REQUIRE_CUDA_KERNELS").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc() else {
        let msg = "nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda): building without CUDA kernels; run scripts/install-nvcc.sh and set NVCC to build them";
        if required {
            panic!("LALORA_REQUIRE_CUDA_KERNELS=1 but {msg}");
        }
        println!("cargo::warning={msg}");
        return;
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = env::var("LALORA_CUDA_ARCH").unwrap_or_else(|_| "compute_80".into());
    for src in sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
    {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file names are UTF-8");
        let ptx = out.join(format!("{stem}.ptx"));
        let result = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch={arch}"))
            .arg("-I")
            .arg(kernels)
            .arg("-o")
            .arg(&ptx)
            .arg(src)
            .output();
        match result {
            Ok(o) if o.status.success() => {
                compact(&ptx);
                deflate(&ptx);
            }
            Ok(o) => panic!(
                "nvcc failed on {}:\n{}{}",
                src.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run {}: {e}", nvcc.display()),
        }
    }
    println!("cargo::rustc-cfg=lalora_cuda_kernels");
    // The kernel files, so a test can check each is registered without reading the source
    // tree at run time (test binaries also run on machines without it).
    let stems: Vec<&str> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .filter_map(|p| p.file_stem().and_then(|s| s.to_str()))
        .collect();
    println!("cargo::rustc-env=LALORA_KERNEL_FILES={}", stems.join(","));
    // The PTX tests run the ptxas beside this nvcc.
    println!("cargo::rustc-env=LALORA_BUILD_NVCC={}", nvcc.display());
}
