//! Base-model weights on the host in f32, and the HF safetensors loader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::config::LlamaConfig;
use super::proj::Proj;
use super::quant::StoredMatrix;
use crate::error::{Error, IoContext, Result};

/// One transformer block's frozen weights, row-major `W (d_out x d_in)`.
pub struct HostLayer {
    pub attn_norm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// Indexed by `Proj::index()`.
    pub proj: [Vec<f32>; 7],
}

pub struct HostWeights {
    /// `(vocab, hidden)`.
    pub embed: Vec<f32>,
    pub layers: Vec<HostLayer>,
    pub final_norm: Vec<f32>,
    /// `None` when the output layer is tied to the embeddings.
    pub lm_head: Option<Vec<f32>>,
    /// The file's compact forms of these matrices, where it has them (`TensorSource::stored`).
    pub stored: StoredWeights,
}

/// The compact forms a model file stores its matrices in, beside their f32 values in
/// [`HostWeights`]; `None` where the file holds f32, or a form not worth keeping.
#[derive(Default)]
pub struct StoredWeights {
    pub embed: Option<StoredMatrix>,
    pub lm_head: Option<StoredMatrix>,
    /// Per layer, indexed by `Proj::index()`.
    pub proj: Vec<[Option<StoredMatrix>; 7]>,
}

impl StoredWeights {
    /// Every matrix kept.
    pub fn into_matrices(self) -> impl Iterator<Item = StoredMatrix> {
        [self.embed, self.lm_head]
            .into_iter()
            .chain(self.proj.into_iter().flatten())
            .flatten()
    }
}

/// Anything that can hand out named tensors as f32 with a checked shape.
pub trait TensorSource {
    fn has(&self, name: &str) -> bool;
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// The matrix `name` (which `get` has read) in the compact form the file stores it,
    /// for a backend to read instead where few rows are multiplied by it; `None` when the
    /// form saves too little to be worth its memory beside the f32 values.
    fn stored(&self, name: &str) -> Option<StoredMatrix> {
        let _ = name;
        None
    }
}

/// A tensor read from a file holds finite values only; else where the first NaN or
/// infinity is. A model, adapter or curvature file with one is refused when it is read
/// (exit 2, naming the file and tensor), not found later as a non-finite loss that would
/// seem to blame the data.
///
/// Why by chunks: a search for the first bad value stops at each element, so the compiler
/// keeps it scalar (8.7 % of loading SmolLM2's GGUF went to it); a chunk's test without an
/// early exit vectorises, and only a chunk that fails is searched.
pub fn finite(data: &[f32]) -> std::result::Result<(), String> {
    const CHUNK: usize = 4096;
    for (c, chunk) in data.chunks(CHUNK).enumerate() {
        if !chunk.iter().fold(false, |bad, x| bad | !x.is_finite()) {
            continue;
        }
        if let Some(j) = chunk.iter().position(|x| !x.is_finite()) {
            let i = c * CHUNK + j;
            return Err(format!("holds {} at index {i}", data[i]));
        }
    }
    Ok(())
}

/// Convert little-endian raw bytes of a floating dtype to f32.
pub fn bytes_to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Memory-mapped safetensors file(s): one file or a sharded set with an index.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

pub fn mmap_file(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).at(path)?;
    // Mapping a directory fails with ENODEV ("No such device"), which names nothing useful.
    if f.metadata().at(path)?.is_dir() {
        return Err(Error::file(
            path,
            "is a directory; a file was expected here",
        ));
    }
    // SAFETY: the file is opened read-only and treated as immutable for our lifetime; a
    // concurrent writer truncating it is outside what any loader can defend against.
    unsafe { Mmap::map(&f) }.at(path)
}

impl SafetensorsSource {
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let map = mmap_file(p)?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| Error::file(p, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            files.push((p.clone(), map));
        }
        Ok(SafetensorsSource { files, index })
    }

    /// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_hf_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_files(&[single]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.exists() {
            return Err(Error::file(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        }
        let shards = index_shards(&index_path)?;
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        Self::open_files(&paths)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The bytes of every file, in the order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &[u8]> {
        self.files.iter().map(|(_, m)| &m[..])
    }

    /// The tensor as f32 along with its shape, whatever shape it has.
    pub fn get_any(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::usage(format!("tensor `{name}` not found")))?;
        let (path, map) = &self.files[i];
        let st = SafeTensors::deserialize(map)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        let t = st
            .tensor(name)
            .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
        let data = bytes_to_f32(t.dtype(), t.data()).ok_or_else(|| {
            Error::file(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", t.dtype()),
            )
        })?;
        Ok((data, t.shape().to_vec()))
    }

    fn path_of(&self, name: &str) -> &Path {
        self.index
            .get(name)
            .map(|&i| self.files[i].0.as_path())
            .unwrap_or_else(|| self.files[0].0.as_path())
    }
}

impl TensorSource for SafetensorsSource {
    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if !self.has(name) {
            let path = self.files.first().map(|f| f.0.clone()).unwrap_or_default();
            return Err(Error::file(path, format!("tensor `{name}` not found")));
        }
        let (data, got) = self.get_any(name)?;
        if got != shape {
            return Err(Error::file(
                self.path_of(name),
                format!("tensor `{name}` has shape {got:?}, expected {shape:?}"),
            ));
        }
        finite(&data)
            .map_err(|e| Error::file(self.path_of(name), format!("tensor `{name}` {e}")))?;
        Ok(data)
    }
}

/// Load every base weight through `names` (HF or GGUF naming) with shape checks.
pub fn load_weights(
    cfg: &LlamaConfig,
    src: &dyn TensorSource,
    names: &dyn Fn(WeightName) -> String,
) -> Result<HostWeights> {
    let d = cfg.hidden_size;
    let embed_name = names(WeightName::Embed);
    let embed = src.get(&embed_name, &[cfg.vocab_size, d])?;
    let mut stored = StoredWeights {
        embed: src.stored(&embed_name),
        ..StoredWeights::default()
    };
    let mut layers = Vec::new();
    for l in 0..cfg.num_layers {
        let attn_norm = src.get(&names(WeightName::AttnNorm(l)), &[d])?;
        let mlp_norm = src.get(&names(WeightName::MlpNorm(l)), &[d])?;
        let proj = Proj::ALL.map(|p| {
            let (din, dout) = p.dims(cfg);
            src.get(&names(WeightName::Proj(l, p)), &[dout, din])
        });
        stored
            .proj
            .push(Proj::ALL.map(|p| src.stored(&names(WeightName::Proj(l, p)))));
        let [q, k, v, o, g, u, dn] = proj;
        layers.push(HostLayer {
            attn_norm,
            mlp_norm,
            proj: [q?, k?, v?, o?, g?, u?, dn?],
        });
    }
    let final_norm = src.get(&names(WeightName::FinalNorm), &[d])?;
    let head_name = names(WeightName::LmHead);
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        stored.lm_head = src.stored(&head_name);
        Some(src.get(&head_name, &[cfg.vocab_size, d])?)
    };
    Ok(HostWeights {
        embed,
        layers,
        final_norm,
        lm_head,
        stored,
    })
}

/// The block count of the weights must be the configuration's: a tensor of a block past
/// `num_layers` means the configuration describes part of the model, a missing last block
/// that it describes another one. `prefix` is `model.layers.` (HF) or `blk.` (GGUF).
pub fn check_layer_count<'a>(
    names: impl Iterator<Item = &'a str>,
    prefix: &str,
    cfg: &LlamaConfig,
) -> std::result::Result<(), String> {
    let held = names
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |l| l.saturating_add(1));
    if held != cfg.num_layers {
        return Err(format!(
            "the configuration has {} layers but the weights hold {held}",
            cfg.num_layers
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub enum WeightName {
    Embed,
    AttnNorm(usize),
    MlpNorm(usize),
    Proj(usize, Proj),
    FinalNorm,
    LmHead,
}

pub fn hf_name(w: WeightName) -> String {
    match w {
        WeightName::Embed => "model.embed_tokens.weight".into(),
        WeightName::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
        WeightName::MlpNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
        WeightName::Proj(l, p) => format!("model.layers.{l}.{}.weight", p.hf_path()),
        WeightName::FinalNorm => "model.norm.weight".into(),
        WeightName::LmHead => "lm_head.weight".into(),
    }
}

impl HostWeights {
    /// Output-layer matrix `(vocab, hidden)`: the LM head, or the embeddings when tied.
    pub fn output(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }
}

/// The shard file names that `model.safetensors.index.json` (at `index_path`) maps the
/// tensors to, sorted and without repeats.
pub fn index_shards(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).at(index_path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(index_path, format!("malformed JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index_path, "missing `weight_map` object"))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    // A shard is a file of this directory: a name that leaves it (`../x`, `/x`) is
    // refused, as HF's loaders only ever join a plain file name.
    if let Some(s) = shards.iter().find(|s| {
        !Path::new(s)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    }) {
        return Err(Error::file(
            index_path,
            format!("shard `{s}` is not a file name inside the model directory"),
        ));
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::finite;

    /// The first non-finite value is named by its index wherever it falls among the
    /// chunks that `finite` tests whole: at either side of a chunk's edge, in a last
    /// partial chunk, and before a second one.
    #[test]
    fn finite_names_the_first_bad_value_across_chunks() {
        let n = 3 * 4096 + 17;
        assert_eq!(finite(&vec![1.5; n]), Ok(()));
        for (at, bad) in [(0, f32::NAN), (4095, f32::INFINITY), (4096, f32::NAN)]
            .into_iter()
            .chain([(9000, f32::NEG_INFINITY), (n - 1, f32::NAN)])
        {
            let mut data = vec![-2.0; n];
            data[at] = bad;
            if at + 1 < n {
                data[n - 1] = f32::NAN;
            }
            assert_eq!(
                finite(&data),
                Err(format!("holds {bad} at index {at}")),
                "{bad} at {at}"
            );
        }
    }
}
