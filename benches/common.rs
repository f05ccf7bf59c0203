//! Shared set-up for the benchmarks: the default model and a fixed batch of real text.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use lalora_engine::backend::Backend;
use lalora_engine::backend::cpu::CpuBackend;
use lalora_engine::data::{Batch, RowFormat, read_jsonl};
use lalora_engine::model::{self, HostLora, Llama, LoraConfig, Proj};

pub const BATCH: usize = 4;
pub const SEQ: usize = 256;
pub const THREADS: usize = 2;

/// Runs `f` on a thread of the rayon pool (built with `THREADS`), where the commands run
/// too (`device::run_on`): parallel loops started there split their work in place, rather
/// than handing it to the pool and sleeping.
pub fn in_pool(f: impl FnOnce() + Send) {
    let _ = CpuBackend::new(THREADS);
    rayon::scope(|_| f());
}

/// Runs the benchmark groups and criterion's summary [`in_pool`].
pub fn on_pool(groups: fn()) {
    in_pool(|| {
        groups();
        criterion::Criterion::default()
            .configure_from_args()
            .final_summary();
    });
}

pub fn assets() -> PathBuf {
    std::env::var_os("ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

pub struct Setup {
    pub be: CpuBackend,
    pub model: Llama<CpuBackend>,
    pub lora: HostLora,
    pub batch: Batch,
}

/// SmolLM2-135M, LoRA r=8 alpha=16 on all seven projections, and the first `BATCH` QuAC
/// passages of at least `SEQ` tokens, cut to `SEQ`.
pub fn smollm2_setup() -> Setup {
    let be = CpuBackend::new(THREADS);
    // The SIMD level belongs with every figure (AVX2-only and AVX-512 machines differ).
    eprintln!("bench backend: {}", be.describe());
    let path = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = model::load(&path, None).expect("run scripts/fetch-assets.sh first");
    let data = assets().join("data/source-curvature.jsonl");
    let ex = read_jsonl(
        &data,
        m.tokenizer(),
        m.cfg.vocab_size,
        RowFormat { max_len: SEQ },
    )
    .unwrap();
    let ex: Vec<_> = ex
        .into_iter()
        .filter(|e| e.ids.len() == SEQ)
        .take(BATCH)
        .collect();
    assert_eq!(ex.len(), BATCH);
    let batch = Batch::new(&ex.iter().collect::<Vec<_>>());
    // PEFT's init (B = 0): the loss equals the base model's, so the peer's must match it.
    let lora = HostLora::init(
        &m.cfg,
        LoraConfig {
            r: 8,
            alpha: 16.0,
            use_rslora: false,
            targets: Proj::ALL.to_vec(),
        },
        0,
    );
    let model = Llama::new(&be, m.cfg, m.weights).unwrap();
    Setup {
        be,
        model,
        lora,
        batch,
    }
}
