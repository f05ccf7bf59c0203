"""Shared set-up of the Python peers: SmolLM2-135M (the Q4_1 GGUF, dequantised to f32 by
transformers), PEFT LoRA r=8 alpha=16 on all seven projections (B = 0, PEFT's init), and
the engine's benchmark batch: the first 4 QuAC passages of
assets/data/source-curvature.jsonl with >= 256 tokens, cut to 256."""
import json
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(assets, threads, batch=4, seq=256):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(assets, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(assets, gguf_file=GGUF, torch_dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    rows = []
    with open(os.path.join(assets, "data/source-curvature.jsonl")) as f:
        for line in f:
            ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= seq:
                rows.append(ids[:seq])
            if len(rows) == batch:
                break
    return model, torch.tensor(rows)


def summed_loss(model, ids):
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def passes(model, ids):
    """The two timed passes, as the engine's benches run them: `forward_backward` (the
    summed loss and its backward, returning the loss; gradients accumulate as the engine's
    do) and `forward` (the logits, without gradients)."""
    def forward_backward():
        loss = summed_loss(model, ids)
        loss.backward()
        return loss.item()

    def forward():
        with torch.no_grad():
            model(input_ids=ids)
    return {"forward_backward": forward_backward, "forward": forward}


def timed(fn, n):
    fn()  # warm-up
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def default_assets():
    return os.environ.get("ASSETS_DIR", os.path.join(ROOT, "assets"))
