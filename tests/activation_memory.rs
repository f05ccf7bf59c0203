//! `info`'s memory estimate against what the CUDA backend holds on the simulator, which
//! counts every byte it allocates (`CudaBackend::memory`): the kept activations of a
//! training forward equal `kept_activation_bytes` exactly, in both storage layouts (f32,
//! which is also the CPU's, and bf16 with flash attention), on every projection path,
//! with LoRA on all seven projections and on two; and the weights take the bytes `info`
//! states. A step's peak is above what the forward keeps (the backward's own buffers),
//! which `info` says it leaves out.

mod common;

use common::*;
use lalora_engine::backend::Backend;
use lalora_engine::backend::cuda::{BaseDtype, ProjectionGemm};
use lalora_engine::model::llama::{self, ActStorage, kept_activation_bytes};
use lalora_engine::model::{HostLora, LoraConfig, LoraWeights, Proj};
use lalora_engine::train::grad::accumulate_gradients;

#[test]
fn kept_activations_and_weights_are_the_bytes_the_device_holds() {
    let t = tiny();
    let batch = whole_batch(&t.examples);
    let cfg = t.loaded.cfg.clone();
    let two = LoraConfig {
        r: 8,
        alpha: 16.0,
        use_rslora: false,
        targets: vec![Proj::Q, Proj::V],
    };
    let adapters: [LoraWeights<Vec<f32>>; 2] = [t.adapter.clone(), HostLora::init(&cfg, two, 0)];
    for (base, storage, weight_bytes) in [
        (BaseDtype::F32, ActStorage::F32, 4),
        (BaseDtype::Bf16, ActStorage::Bf16Flash, 2),
    ] {
        let be = sim(base);
        let empty = be.memory().live;
        let model = tiny_model(&be);
        // The matrices in the base storage type, the norms' gains in f32.
        let norms = (2 * cfg.num_layers + 1) * cfg.hidden_size;
        let want = weight_bytes * (cfg.n_params() - norms) + 4 * norms;
        assert_eq!(be.memory().live - empty, want, "{base:?} weights");
        assert_eq!(llama::weight_bytes(&cfg, storage), want as u64);
        for path in ProjectionGemm::ALL {
            be.set_projection_gemm(path);
            for host in &adapters {
                let lora = host.map(|v| be.buf(v.clone())).unwrap();
                let mut grads = host.map(|v| be.zeros(v.len())).unwrap();
                let before = be.memory().live;
                let acts = model.forward(&be, Some(&lora), &batch, true).unwrap();
                let kept = (be.memory().live - before) as u128;
                let want = kept_activation_bytes(
                    &cfg,
                    host.cfg.r,
                    host.cfg.targets.len(),
                    batch.batch,
                    batch.seq_len,
                    storage,
                );
                let what = format!("{base:?} {path:?} r={} {:?}", host.cfg.r, host.cfg.targets);
                assert_eq!(kept, want, "{what}: kept activations");
                drop(acts);
                assert_eq!(be.memory().live, before, "{what}: all freed");

                be.reset_peak();
                accumulate_gradients(&be, &model, &lora, &batch, 1.0, &mut grads).unwrap();
                let peak = (be.memory().peak - before) as u128;
                assert!(peak > kept, "{what}: step peak {peak} vs kept {kept}");
            }
        }
    }
}
