//! `generate`: continue a prompt (greedy or sampled), optionally with an adapter.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{Common, ModelArgs, load_model, print_json};
use crate::backend::Backend;
use crate::backend::device::{BackendTask, run_on};
use crate::data::jsonl::qa_prompt;
use crate::error::Result;
use crate::eval::generate::{Sampling, generate};
use crate::model::{HostLora, Llama, LoadedModel};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a question in the training format ("Question: ...\nAnswer:").
    #[arg(long)]
    pub question: bool,
    /// Tokens to generate at most (fewer where the model says EOS).
    #[arg(long, allow_negative_numbers = true, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub top_p: f32,
    #[command(flatten)]
    pub common: Common,
}

struct GenTask {
    model: LoadedModel,
    adapter: Option<HostLora>,
    prompt: Vec<u32>,
    sampling: Sampling,
}

impl BackendTask for GenTask {
    type Output = String;
    fn run<B: Backend>(mut self, be: &B) -> Result<String> {
        let tok = self.model.tokenizer()?;
        let stop: Vec<u32> = tok.eos.into_iter().collect();
        let lora = match &self.adapter {
            Some(h) => Some(h.map(|v| be.buf(v.clone()))?),
            None => None,
        };
        let weights = self.model.take_weights();
        let model = Llama::new(be, self.model.cfg.clone(), weights)?;
        let out = generate(
            be,
            &model,
            lora.as_ref(),
            &self.prompt,
            &self.sampling,
            &stop,
        )?;
        self.model.tokenizer()?.decode(&out)
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let adapter = a
        .adapter
        .as_deref()
        .map(|d| HostLora::load(d, &m.cfg))
        .transpose()?;
    let text = if a.question {
        qa_prompt(&a.prompt)
    } else {
        a.prompt.clone()
    };
    let prompt = m.tokenizer()?.encode_with_special(&text)?;
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        seed: a.common.seed,
    };
    // --json owns stdout only: the device line stays on stderr unless --quiet.
    let quiet = a.common.quiet;
    let completion = run_on(
        a.common.placement(quiet),
        GenTask {
            model: m,
            adapter,
            prompt,
            sampling,
        },
    )?;
    if a.common.json {
        print_json(&json!({"prompt": text, "completion": completion}));
    } else {
        println!("{text}{completion}");
    }
    Ok(())
}
