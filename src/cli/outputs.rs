//! Output paths, checked before any input is read or any work is done. An output that
//! cannot be written (its parent a file, a read-only or pseudo file system, no permission)
//! or that would replace one of the run's own inputs is refused at once, naming the path
//! (exit 2), instead of after the estimate or the training it was to hold.

use std::path::{Path, PathBuf};

use super::Command;
use crate::curvature::self_data;
use crate::error::{Error, Result};
use crate::io::{check_replaceable, probe_writable};
use crate::model::weights::index_shards;

/// What an output flag names.
#[derive(Clone, Copy)]
enum Kind {
    /// A file, written whole (atomically) at the end.
    File,
    /// A directory the command creates if missing and writes its files in.
    Dir,
}

/// Check every output of `cmd` against its inputs.
pub(super) fn validate(cmd: &Command) -> Result<()> {
    match cmd {
        Command::Grad(a) => {
            let inputs = [
                ("--model", Some(&a.model.model)),
                ("--tokenizer", a.model.tokenizer.as_ref()),
                ("--adapter", a.adapter.as_ref()),
                ("--data", Some(&a.data)),
            ];
            check(&a.out, Kind::File, &inputs)
        }
        Command::Curvature(a) => {
            let e = &a.estimate;
            let inputs = [
                ("--model", Some(&a.model.model)),
                ("--tokenizer", a.model.tokenizer.as_ref()),
                ("--adapter", a.adapter.as_ref()),
                ("--data", Some(&a.data)),
                ("--self-prompts", e.self_prompts.as_ref()),
                ("--warmup-data", e.warmup_data.as_ref()),
            ];
            check(&a.out, Kind::File, &inputs)?;
            // Self-generated data are kept beside the curvature file.
            match self_data::parse(&a.data)? {
                Some(_) => check(&self_data::jsonl_path(&a.out), Kind::File, &inputs),
                None => Ok(()),
            }
        }
        Command::Train(a) => {
            let inputs = [
                ("--model", Some(&a.model.model)),
                ("--tokenizer", a.model.tokenizer.as_ref()),
                ("--adapter", a.adapter.as_ref()),
                ("--data", Some(&a.data)),
                ("--curvature", a.curvature.as_ref()),
            ];
            check(&a.out, Kind::Dir, &inputs)
        }
        Command::Sweep(a) => {
            let e = &a.estimate;
            let mut inputs = vec![
                ("--model", Some(&a.model.model)),
                ("--tokenizer", a.model.tokenizer.as_ref()),
                ("--data", Some(&a.data)),
                ("--curvature", a.curvature.as_ref()),
                ("--curvature-data", a.curvature_data.as_ref()),
                ("--target-eval", Some(&a.target_eval)),
                ("--exact-match-eval", a.exact_match_eval.as_ref()),
                ("--self-prompts", e.self_prompts.as_ref()),
                ("--warmup-data", e.warmup_data.as_ref()),
            ];
            inputs.extend(a.source_eval.iter().map(|p| ("--source-eval", Some(p))));
            inputs.extend(a.choice_eval.iter().map(|p| ("--choice-eval", Some(p))));
            check(&a.out, Kind::Dir, &inputs)
        }
        Command::Demo(a) => check(&a.out_dir(), Kind::Dir, &[("--assets", a.assets.as_ref())]),
        Command::Info(_) | Command::Eval(_) | Command::Generate(_) | Command::Selftest(_) => Ok(()),
    }
}

/// Whether `path`, a file of the directory `dir`, is one a model or adapter directory is
/// read from: the configurations, the tokenizer, the weights and their shards (HF's
/// `model-00001-of-00002.safetensors`, or whatever names `dir`'s
/// `model.safetensors.index.json` lists), the adapter's two files.
fn read_in_dirs(dir: &Path, path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    // An index that cannot be read is the loader's to report; here it lists nothing.
    let listed = || {
        index_shards(&dir.join("model.safetensors.index.json"))
            .is_ok_and(|shards| shards.iter().any(|s| *s == name))
    };
    const READ: [&str; 6] = [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ];
    READ.contains(&name.as_ref())
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
        || listed()
}

/// `out` can be written as `kind`, and writing it replaces none of `inputs` (flag, path;
/// absent or not yet existing inputs are the loaders' to report).
fn check(out: &Path, kind: Kind, inputs: &[(&str, Option<&PathBuf>)]) -> Result<()> {
    let inputs: Vec<(&str, PathBuf)> = inputs
        .iter()
        .filter_map(|(flag, p)| Some((*flag, std::fs::canonicalize((*p)?).ok()?)))
        .collect();
    match kind {
        Kind::File => {
            if std::fs::metadata(out).is_ok_and(|m| m.is_dir()) {
                return Err(Error::file(
                    out,
                    "is a directory; --out names the file to write",
                ));
            }
            check_replaceable(out)?;
            if let Ok(target) = std::fs::canonicalize(out) {
                for (flag, input) in &inputs {
                    if target == *input {
                        return Err(Error::file(
                            out,
                            format!("is the {flag} file; writing --out there would destroy it"),
                        ));
                    }
                    if target.parent() == Some(input.as_path()) && read_in_dirs(input, &target) {
                        return Err(Error::file(
                            out,
                            format!(
                                "is a file the {flag} directory is read from; writing --out there would replace it"
                            ),
                        ));
                    }
                }
            }
        }
        Kind::Dir => {
            if std::fs::metadata(out).is_ok_and(|m| !m.is_dir()) {
                return Err(Error::file(
                    out,
                    "exists and is not a directory; --out names a directory",
                ));
            }
            if let Ok(target) = std::fs::canonicalize(out) {
                for (flag, input) in &inputs {
                    if target == *input {
                        return Err(Error::file(
                            out,
                            format!(
                                "is the {flag} directory; a run's outputs are not written among its inputs (name a new directory)"
                            ),
                        ));
                    }
                }
            }
        }
    }
    let start = match kind {
        Kind::File => out.parent().filter(|p| !p.as_os_str().is_empty()),
        Kind::Dir => Some(out),
    };
    writable_ancestor(start.unwrap_or(Path::new(".")), out)
}

/// The nearest existing ancestor of `dir` (itself included) is a directory in which a
/// file can be created (`probe_writable`).
fn writable_ancestor(dir: &Path, out: &Path) -> Result<()> {
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(Error::file(
                    at,
                    format!(
                        "is not a directory, so --out {} cannot be created in it",
                        out.display()
                    ),
                ));
            }
            Err(_) => match at.parent() {
                Some(p) if !p.as_os_str().is_empty() => at = p,
                _ => {
                    at = Path::new(".");
                    break;
                }
            },
        }
    }
    probe_writable(at).map_err(|e| {
        Error::file(
            at,
            format!(
                "cannot create a file here ({}), so --out {} cannot be written",
                e.kind(),
                out.display()
            ),
        )
    })
}
