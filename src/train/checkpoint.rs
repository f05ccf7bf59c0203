//! Checkpoints for an exact resume, safe against a crash at any instant.
//!
//! A checkpoint is a directory holding the adapter (PEFT layout), the AdamW moments
//! (`optimizer.safetensors`: `exp_avg.<name>`, `exp_avg_sq.<name>`), `trainer_state.json`
//! (step, training settings, run identity) and `metrics.jsonl` (the steps so far). The data
//! order and every random draw follow from (seed, step), so nothing else is needed.
//!
//! Layout: two slots, `OUT/checkpoint-a/` and `OUT/checkpoint-b/`, and `OUT/checkpoint`, a
//! symbolic link naming the current one. A save writes the slot the link does not name,
//! then switches the link with one `rename(2)` of a staged link over it, which is atomic,
//! and only then removes the old slot. So at every instant `OUT/checkpoint` is absent
//! (before the first save) or names a complete checkpoint: a crash leaves at worst an
//! unnamed slot or a staged link, which the next run removes ([`clean_stale`]).
//! `OUT/checkpoint/...` paths keep working for readers (PEFT loads the adapter in it).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::finite::first_non_finite;
use super::identity::RunIdentity;
use super::trainer::{StepMetrics, TrainConfig};
use crate::error::{Error, IoContext, Result};
use crate::io::{PROBE_PREFIX, TEMP_PREFIX, TensorFile, atomic_write, write_safetensors};
use crate::model::HostLora;
use crate::model::config::LlamaConfig;

const POINTER: &str = "checkpoint";
const SLOTS: [&str; 2] = ["checkpoint-a", "checkpoint-b"];
/// Staged links are `checkpoint.tmp-<pid>` (older versions staged directories under the
/// same prefix): any left at start is stale.
const STAGED: &str = "checkpoint.tmp-";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub config: TrainConfig,
    /// What else defines the run; `--resume` refuses a different one.
    pub run: RunIdentity,
    /// The curvature file the penalty came from, if any (for the reader).
    pub curvature: Option<PathBuf>,
}

pub struct Checkpoint {
    pub state: TrainerState,
    pub lora: HostLora,
    pub m: HostLora,
    pub v: HostLora,
    /// Metrics of steps 1..=state.step, so the final `metrics.jsonl` of a resumed run is
    /// whole.
    pub metrics: Vec<StepMetrics>,
}

/// `OUT/checkpoint`: the link to the current checkpoint.
pub fn dir(out: &Path) -> PathBuf {
    out.join(POINTER)
}

/// Whether `out` holds a checkpoint (`OUT/checkpoint` is one of our links).
pub fn exists(out: &Path) -> Result<bool> {
    current(out).map(|slot| slot.is_some())
}

/// The slot `OUT/checkpoint` names: `None` before the first save; an error when it is
/// anything but one of our links (then it is not ours to replace).
fn current(out: &Path) -> Result<Option<&'static str>> {
    let p = dir(out);
    let meta = match std::fs::symlink_metadata(&p) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        r => r.at(&p)?,
    };
    let target = if meta.file_type().is_symlink() {
        std::fs::read_link(&p).at(&p)?
    } else {
        PathBuf::new()
    };
    match SLOTS.iter().find(|s| target == Path::new(s)) {
        Some(s) => Ok(Some(s)),
        None => Err(Error::file(
            &p,
            "not a link to checkpoint-a or checkpoint-b (a checkpoint of an older lalora-engine, or not ours); move it away",
        )),
    }
}

/// Remove what a crash can leave: staged links (or an older version's staged
/// directories), the slot the link does not name, temporaries of atomic writes (of the
/// adapter or `metrics.jsonl`) and the output check's probe file (`io::probe_writable`;
/// a random SIGKILL in `tests/crash.rs` landed on it). Call with the output directory
/// locked, before a run reads or writes checkpoints.
pub fn clean_stale(out: &Path) -> Result<()> {
    let cur = current(out)?;
    for entry in std::fs::read_dir(out).at(out)? {
        let entry = entry.at(out)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with(STAGED)
            || name.starts_with(TEMP_PREFIX)
            || name.starts_with(PROBE_PREFIX)
            || (SLOTS.contains(&name.as_str()) && cur != Some(name.as_str()));
        if stale {
            remove(&entry.path())?;
        }
    }
    Ok(())
}

/// Points a save can be stopped at, to test that each leaves a resumable directory.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavePoint {
    /// The new slot is complete; the link still names the old one.
    SlotWritten,
    /// The link to the new slot is staged beside `OUT/checkpoint`.
    LinkStaged,
    /// `OUT/checkpoint` names the new slot; the old one is not yet removed.
    LinkSwitched,
}

/// Write `ck` as the current checkpoint of `out`.
pub fn save(out: &Path, ck: &Checkpoint, base_model: &str) -> Result<()> {
    save_until(out, ck, base_model, |_| Ok(()))
}

/// [`save`], calling `at` at each [`SavePoint`]: an `Err` from it stops the save there,
/// leaving the directory as a crash at that instant would (for tests).
#[doc(hidden)]
pub fn save_until(
    out: &Path,
    ck: &Checkpoint,
    base_model: &str,
    mut at: impl FnMut(SavePoint) -> Result<()>,
) -> Result<()> {
    let old = current(out)?;
    let slot = if old == Some(SLOTS[0]) {
        SLOTS[1]
    } else {
        SLOTS[0]
    };
    let d = out.join(slot);
    remove(&d)?;
    std::fs::create_dir(&d).at(&d)?;
    write_slot(&d, ck, base_model)?;
    sync_dir(&d)?;
    at(SavePoint::SlotWritten)?;
    let staged = out.join(format!("{STAGED}{}", std::process::id()));
    remove(&staged)?;
    std::os::unix::fs::symlink(slot, &staged).at(&staged)?;
    at(SavePoint::LinkStaged)?;
    std::fs::rename(&staged, dir(out)).at(dir(out))?;
    sync_dir(out)?;
    at(SavePoint::LinkSwitched)?;
    match old {
        Some(o) => remove(&out.join(o)),
        None => Ok(()),
    }
}

fn write_slot(d: &Path, ck: &Checkpoint, base_model: &str) -> Result<()> {
    ck.lora.save(d, base_model)?;
    let mut t: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (prefix, w) in [("exp_avg", &ck.m), ("exp_avg_sq", &ck.v)] {
        for (name, shape, data) in w.named_tensors() {
            t.push((format!("{prefix}.{name}"), shape, data));
        }
    }
    write_safetensors(&d.join("optimizer.safetensors"), &t, Default::default())?;
    let metrics = StepMetrics::jsonl(&ck.metrics);
    atomic_write(&d.join("metrics.jsonl"), metrics.as_bytes())?;
    let json = serde_json::to_string_pretty(&ck.state).unwrap_or_default();
    atomic_write(&d.join("trainer_state.json"), json.as_bytes())
}

/// The current checkpoint of `out`.
pub fn load(out: &Path, model: &LlamaConfig) -> Result<Checkpoint> {
    let Some(slot) = current(out)? else {
        return Err(Error::file(dir(out), "no checkpoint to resume from"));
    };
    let d = out.join(slot);
    let sp = d.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).at(&sp)?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::file(&sp, format!("malformed trainer state: {e}")))?;
    let lora = HostLora::load(&d, model)?;
    let op = d.join("optimizer.safetensors");
    let f = TensorFile::read(&op)?;
    let moment = |prefix: &str| -> Result<HostLora> {
        let mut w = lora.zeros_like();
        for (t, name) in w
            .tensors_mut()
            .zip(lora.named_tensors().into_iter().map(|n| n.0))
        {
            let key = format!("{prefix}.{name}");
            let data = f
                .get(&key)
                .ok_or_else(|| Error::file(&op, format!("tensor `{key}` missing")))?;
            if data.len() != t.len() {
                return Err(Error::file(
                    &op,
                    format!("tensor `{key}` has the wrong size"),
                ));
            }
            t.copy_from_slice(data);
        }
        Ok(w)
    };
    let (m, v) = (moment("exp_avg")?, moment("exp_avg_sq")?);
    // Saves happen only after the step's checks, so a non-finite value here means the
    // files were damaged: refuse to continue from them.
    let tensors = [("", &lora), ("exp_avg.", &m), ("exp_avg_sq.", &v)]
        .into_iter()
        .flat_map(|(prefix, w)| {
            w.named_tensors()
                .into_iter()
                .map(move |(n, _, d)| (format!("{prefix}{n}"), d))
        });
    if let Some(name) = first_non_finite(tensors) {
        return Err(Error::file(&d, format!("non-finite values in `{name}`")));
    }
    let mp = d.join("metrics.jsonl");
    let metrics = std::fs::read_to_string(&mp)
        .at(&mp)?
        .lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::line(&mp, i + 1, format!("{e}"))))
        .collect::<Result<Vec<StepMetrics>>>()?;
    Ok(Checkpoint {
        state,
        lora,
        m,
        v,
        metrics,
    })
}

/// Remove a file, link or directory tree if it exists.
fn remove(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).at(p),
        Ok(_) => std::fs::remove_file(p).at(p),
    }
}

/// Make a directory's entries durable (a rename is on disk only once its directory is).
fn sync_dir(d: &Path) -> Result<()> {
    std::fs::File::open(d).and_then(|f| f.sync_all()).at(d)
}
