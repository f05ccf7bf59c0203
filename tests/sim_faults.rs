//! Kernel research through `LALORA_PTX_DIR`: PTX edited by hand is loaded instead of the
//! embedded text, and the simulator's checks catch what the edit breaks. A device fault
//! ends the command with one line naming the kernel and exit code 3; PTX that does not
//! parse, or lacks an entry the backend launches, is bad input (exit 2, naming the file).

mod common;

use std::path::Path;

use common::*;
use lalora_engine::backend::cuda::kernels::MODULES;

/// The embedded PTX of every module, written to `dir` by `selftest --write-ptx`.
fn write_ptx(dir: &Path) {
    let o = bin()
        .arg("selftest")
        .arg("--write-ptx")
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for m in MODULES.iter() {
        let text = std::fs::read_to_string(dir.join(format!("{}.ptx", m.name))).unwrap();
        assert_eq!(text, m.ptx(), "{}.ptx is the embedded text", m.name);
    }
}

/// The text of entry `name` in `ptx`, edited by `f`.
fn edit_entry(ptx: &str, name: &str, f: impl Fn(&str) -> String) -> String {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no entry {name}"));
    let end = start + ptx[start..].find("\n}\n").expect("entry end") + 3;
    format!("{}{}{}", &ptx[..start], f(&ptx[start..end]), &ptx[end..])
}

/// `grad` on the tiny fixture on the simulator with the PTX in `dir`: (exit code, stderr).
fn grad_with(dir: &Path, out: &Path) -> (i32, String) {
    let o = bin()
        .args(["grad", "--device", "sim", "--quiet", "--model"])
        .arg(fixture("tiny-gqa/model"))
        .arg("--adapter")
        .arg(fixture("tiny-gqa/adapter"))
        .arg("--data")
        .arg(fixture("tiny-gqa/batch.jsonl"))
        .arg("--out")
        .arg(out)
        .env("LALORA_PTX_DIR", dir)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn modify(dir: &Path, module: &str, f: impl Fn(&str) -> String) {
    let p = dir.join(format!("{module}.ptx"));
    let text = std::fs::read_to_string(&p).unwrap();
    let new = f(&text);
    assert_ne!(new, text, "the edit changed {module}.ptx");
    std::fs::write(p, new).unwrap();
}

#[test]
fn unedited_ptx_from_the_directory_runs() {
    let d = tempfile::tempdir().unwrap();
    write_ptx(d.path());
    let out = d.path().join("g.safetensors");
    let (code, err) = grad_with(d.path(), &out);
    assert_eq!(code, 0, "{err}");
    assert!(out.exists());
}

#[test]
fn a_read_one_past_the_buffer_is_a_memcheck_fault() {
    let d = tempfile::tempdir().unwrap();
    write_ptx(d.path());
    // The guard of the first loop over a row's 128-bit packs (`tid >= dim / 8` skips it:
    // the default bf16 output moves eight elements a pack) becomes `tid > dim / 8`: thread
    // `dim / 8` of the last row reads the eight elements after the residual buffer (the
    // fixture's hidden size, 64, is whole packs).
    modify(d.path(), "norm", |t| {
        edit_entry(t, "rmsnorm_forward_bf16", |e| {
            e.replacen("setp.ge.s32", "setp.gt.s32", 1)
        })
    });
    let out = d.path().join("g.safetensors");
    let (code, err) = grad_with(d.path(), &out);
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for want in [
        "memcheck",
        "`rmsnorm_forward_bf16`",
        "past the end of allocation",
        "PTX line",
    ] {
        assert!(err.contains(want), "`{want}` in: {err}");
    }
    assert!(!out.exists(), "nothing written after a fault");
}

#[test]
fn removed_barriers_are_a_shared_memory_fault() {
    let d = tempfile::tempdir().unwrap();
    write_ptx(d.path());
    modify(d.path(), "norm", |t| {
        t.lines()
            .filter(|l| !l.trim_start().starts_with("bar.sync"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (code, err) = grad_with(d.path(), &d.path().join("g.safetensors"));
    assert_eq!(code, 3, "{err}");
    // Without barriers a warp reads the block-reduction scratch before the other warps
    // wrote it (initcheck) or while they write it (racecheck), whichever comes first.
    assert!(
        err.contains("rmsnorm_forward_bf16`") && err.contains("shared memory"),
        "{err}"
    );
    assert!(
        err.contains("racecheck") || err.contains("initcheck"),
        "{err}"
    );
}

#[test]
fn a_wrong_argument_list_is_refused_at_launch() {
    let d = tempfile::tempdir().unwrap();
    write_ptx(d.path());
    // The kernel now declares an eighth parameter the backend does not pass.
    modify(d.path(), "norm", |t| {
        t.replacen(
            "\t.param .f32 add_rmsnorm_forward_bf16_param_6\n)",
            "\t.param .f32 add_rmsnorm_forward_bf16_param_6,\n\t.param .u32 add_rmsnorm_forward_bf16_param_7\n)",
            1,
        )
    });
    let (code, err) = grad_with(d.path(), &d.path().join("g.safetensors"));
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("launch of `add_rmsnorm_forward_bf16`")
            && err.contains("7 arguments given, the .entry declares 8"),
        "{err}"
    );
}

#[test]
fn unparsable_ptx_or_a_missing_entry_is_bad_input() {
    let d = tempfile::tempdir().unwrap();
    write_ptx(d.path());
    modify(d.path(), "swiglu", |t| t.replacen("ret;", "ret", 1));
    let (code, err) = grad_with(d.path(), &d.path().join("g.safetensors"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("swiglu.ptx") && err.contains("line"), "{err}");

    write_ptx(d.path());
    modify(d.path(), "rope", |t| {
        t.replace(".entry rope(", ".entry rope_v2(")
    });
    let (code, err) = grad_with(d.path(), &d.path().join("g.safetensors"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("rope.ptx") && err.contains("no `.entry rope`"),
        "{err}"
    );
}
