//! File output that never leaves a half-written file behind, and safetensors helpers.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use memmap2::UncheckedAdvice;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, IoContext, Result};
use crate::model::weights::{bytes_to_f32, mmap_file};

/// `Ok` when `path` is absent or a regular file: an output may replace a file but never
/// a directory, link, FIFO or device (`--out /dev/full` run as root would otherwise
/// replace the device node).
pub fn check_replaceable(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(Error::file(
            path,
            "exists and is not a regular file (a directory, link, FIFO or device); refusing to replace it",
        )),
        _ => Ok(()),
    }
}

/// Names of [`atomic_write`]'s temporaries: a crash can leave one behind, and a later
/// run that owns the directory removes them by this prefix.
pub const TEMP_PREFIX: &str = ".lalora-tmp-";

/// The prefix of [`probe_writable`]'s file.
pub const PROBE_PREFIX: &str = ".lalora-probe-";

/// The temporaries being written now: what a signal that ends the run must not leave
/// behind (destructors do not run when a signal kills the process).
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn in_flight() -> MutexGuard<'static, Vec<PathBuf>> {
    IN_FLIGHT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A temporary (file or directory) listed in [`IN_FLIGHT`] while this guard lives.
struct InFlight(PathBuf);

impl InFlight {
    /// `create` a temporary and list it, under the list's lock: a signal handled meanwhile
    /// waits for the listing, so no temporary exists unlisted.
    fn create<T, E>(
        create: impl FnOnce() -> std::result::Result<T, E>,
        path: impl Fn(&T) -> &Path,
    ) -> std::result::Result<(T, InFlight), E> {
        let mut list = in_flight();
        let t = create()?;
        let p = path(&t).to_path_buf();
        list.push(p.clone());
        Ok((t, InFlight(p)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight().retain(|p| *p != self.0);
    }
}

/// On SIGINT, SIGTERM or SIGHUP (Ctrl-C, `kill`, a closed terminal), remove the
/// temporaries being written, then end as the signal's default action would, so that the
/// caller still sees the signal (exit status 130, 143, ...). Without this a run stopped
/// while writing a large file left the partial file behind under [`TEMP_PREFIX`]. Call
/// once, at start-up; it starts the thread that waits for the signals. SIGKILL cannot be
/// caught: what it leaves, a later run that owns the directory removes (`train`), or the
/// user does.
///
/// A signal this process inherited as ignored (`nohup`, or a background job of a script)
/// stays ignored: handling it would end runs that were meant to outlive it.
pub fn remove_partial_outputs_on_signals() -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let handled: Vec<i32> = [SIGINT, SIGTERM, SIGHUP]
        .into_iter()
        .filter(|&s| !ignored(s))
        .collect();
    if handled.is_empty() {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new(handled)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // Held to the end, so that no new temporary starts meanwhile.
                let paths = in_flight();
                for p in paths.iter() {
                    remove_temporary(p);
                }
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

/// Whether `signal`'s disposition is "ignore" (as inherited; nothing is changed).
fn ignored(signal: i32) -> bool {
    // SAFETY: with a null new action, sigaction only writes the current one into `old`,
    // a zeroed plain C struct of the right type.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Remove a temporary file, or a staging directory with what is in it. The writer runs on
/// meanwhile and may add a file to a directory being removed (the safetensors crate
/// stages its own file there), so a directory is tried a few times. A temporary already
/// renamed into place is gone: nothing to remove.
fn remove_temporary(p: &Path) {
    if std::fs::remove_file(p).is_ok() {
        return;
    }
    for _ in 0..20 {
        match std::fs::remove_dir_all(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => return,
        }
    }
}

/// Whether a file can be created in `dir`, by creating one (listed while it exists, and
/// removed at once). It catches read-only and pseudo file systems that permission bits do
/// not show. Its name is not under [`TEMP_PREFIX`]; a kill while it exists leaves it,
/// and a training run's start removes one from its output directory
/// (`checkpoint::clean_stale`).
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let create = || {
        tempfile::Builder::new()
            .prefix(PROBE_PREFIX)
            .tempfile_in(dir)
    };
    InFlight::create(create, |t| t.path()).map(drop)
}

/// The directory `path` is written in, created if missing.
fn parent_dir(path: &Path) -> Result<&Path> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).at(dir)?;
    Ok(dir)
}

/// Write `bytes` to a temporary file beside `path`, then rename it over `path`. The file
/// gets the mode a plain create would (0666 less the umask), not the temporary's 0600.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    check_replaceable(path)?;
    let dir = parent_dir(path)?;
    let create = || {
        tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)
    };
    let (mut tmp, _listed) = InFlight::create(create, |t| t.path()).at(dir)?;
    tmp.write_all(bytes).at(path)?;
    tmp.as_file().sync_all().at(path)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Serialise f32 tensors `(name, shape, data)` with string metadata, atomically, and
/// without a copy of the whole file in memory: the crate's `serialize_to_file` streams the
/// tensors to disk (a KFAC estimate at Llama-3.2-1B's shapes is 15 GB, which
/// `safetensors::serialize` would first copy into one buffer). The bytes are those of
/// `serialize` with the header's keys sorted (`sort_header`), and the file gets the mode
/// a plain create would, as with [`atomic_write`].
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    check_replaceable(path)?;
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.into_iter().collect();
    let dir = parent_dir(path)?;
    // A directory of our own beside `path`, under the temporaries' prefix so that what a
    // crash leaves is found and removed: the crate stages its file in the same directory
    // as the name it is given, then renames it to that name.
    let create = || tempfile::Builder::new().prefix(TEMP_PREFIX).tempdir_in(dir);
    let (stage, _listed) = InFlight::create(create, |t| t.path()).at(dir)?;
    let staged = stage.path().join("file");
    // The mode a plain create gives, read from such a file before the crate's own (0600)
    // replaces it.
    let mode = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(&staged)
        .and_then(|f| f.metadata())
        .at(path)?
        .permissions();
    safetensors::serialize_to_file(views, Some(meta), &staged).map_err(|e| match e {
        // A full disk or a lost directory, as the output's I/O error.
        safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
        e => Error::file(path, format!("cannot serialise: {e}")),
    })?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&staged)
        .at(path)?;
    let mut head = [0u8; 8];
    f.read_exact(&mut head).at(path)?;
    let mut header = vec![0u8; 8 + u64::from_le_bytes(head) as usize];
    f.seek(SeekFrom::Start(0)).at(path)?;
    f.read_exact(&mut header).at(path)?;
    sort_header(&mut header).map_err(|m| Error::file(path, m))?;
    f.seek(SeekFrom::Start(0)).at(path)?;
    f.write_all(&header).at(path)?;
    f.set_permissions(mode).at(path)?;
    f.sync_all().at(path)?;
    std::fs::rename(&staged, path).map_err(|e| Error::io(path, e))
}

/// Put the keys of a serialised safetensors file's JSON header in sorted order, in place.
/// The crate writes the metadata from a `HashMap`, whose order changes from run to run, so
/// the same tensors and metadata would give different bytes; sorted, a file is a function
/// of its content (and can be compared by hash). Compact JSON of the same keys and values
/// has the same length in any order, so the header's length, its padding and every data
/// offset stay as they were.
fn sort_header(bytes: &mut [u8]) -> std::result::Result<(), String> {
    fn sort(v: &mut serde_json::Value) {
        if let serde_json::Value::Object(m) = v {
            m.sort_keys();
            m.values_mut().for_each(sort);
        }
    }
    let n = bytes
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b) as usize)
        .filter(|&n| bytes.len() >= 8 + n)
        .ok_or("serialised safetensors without a whole header")?;
    let header = &mut bytes[8..8 + n];
    let mut v: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("serialised header: {e}"))?;
    sort(&mut v);
    let sorted = serde_json::to_vec(&v).map_err(|e| format!("serialised header: {e}"))?;
    // The rest of the header is the crate's padding (spaces), as before.
    let json_len = header.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    if sorted.len() != json_len {
        return Err(format!(
            "the sorted header has {} bytes, the original {json_len}",
            sorted.len()
        ));
    }
    header[..json_len].copy_from_slice(&sorted);
    Ok(())
}

/// A whole safetensors file read into memory as f32, with its metadata.
pub struct TensorFile {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<Self> {
        let map = mmap_file(path)?;
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, t) in st.tensors() {
            let data = bytes_to_f32(t.dtype(), t.data()).ok_or_else(|| {
                Error::file(
                    path,
                    format!("tensor `{name}` has unsupported dtype {:?}", t.dtype()),
                )
            })?;
            // Hand the copied pages back: a curvature file is GBs, and its mapped pages
            // would otherwise stay resident beside the copy until the map is dropped.
            let at = t.data().as_ptr() as usize - map.as_ptr() as usize;
            // SAFETY: `map` is a shared read-only mapping of a file, so pages dropped here
            // are read back from the file, unchanged, if anything touches them again; no
            // content is lost (the undefined case is private or anonymous memory). Failure
            // only leaves the pages resident.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, at, t.data().len())
            };
            tensors.insert(name, (t.shape().to_vec(), data));
        }
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(TensorFile { tensors, metadata })
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(|(_, d)| d.as_slice())
    }

    /// Move tensor `name`'s values out (an absent one reads as empty).
    pub fn take(&mut self, name: &str) -> Vec<f32> {
        self.tensors
            .remove(name)
            .map(|(_, d)| d)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed file holds the bytes of the crate's in-memory `serialize` with the
    /// header sorted, gets a plain create's mode, and leaves no temporary behind.
    #[test]
    fn streamed_safetensors_match_the_crates_serialisation() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            (0..35).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<_>>(),
            vec![1.5f32; 4],
            vec![-0.25f32; 1],
        );
        let tensors: Vec<(String, Vec<usize>, &[f32])> = vec![
            ("z.weight".into(), vec![5, 7], &a),
            ("a.bias".into(), vec![4], &b),
            ("m.scalar".into(), vec![1], &c),
        ];
        let meta: BTreeMap<String, String> = (0..12)
            .map(|i| (format!("key{i}"), format!("value {i}")))
            .collect();
        let path = d.path().join("t.safetensors");
        write_safetensors(&path, &tensors, meta.clone()).unwrap();
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, s, x)| {
                let v = TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(x)).unwrap();
                (n.clone(), v)
            })
            .collect();
        let mut want = safetensors::serialize(views, Some(meta.into_iter().collect())).unwrap();
        sort_header(&mut want).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);

        let plain = d.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&path), mode(&plain));
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["plain", "t.safetensors"]);
    }
}
