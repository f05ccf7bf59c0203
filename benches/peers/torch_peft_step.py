#!/usr/bin/env python3
"""PyTorch + PEFT peer of benches/train_step.rs: LoRA forward+backward on SmolLM2-135M.

Same model (the Q4_1 GGUF, dequantised to f32 by transformers' GGUF reader), same batch
(the first 4 QuAC passages of assets/data/source-curvature.jsonl with >= 256 tokens, cut
to 256), LoRA r=8 alpha=16 on all seven projections, same thread count. Prints one JSON
line: seconds per step (median) and tokens/s for forward+backward and forward only.

Run: benches/peers/setup-venv.sh && benches/peers/.venv/bin/python benches/peers/torch_peft_step.py
"""
import argparse
import json
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=os.environ.get("ASSETS_DIR", os.path.join(ROOT, "assets")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(a.assets, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(a.assets, gguf_file=gguf, torch_dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)  # B = 0: loss_sum equals the engine's
    rows = []
    with open(os.path.join(a.assets, "data/source-curvature.jsonl")) as f:
        for line in f:
            ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= a.seq:
                rows.append(ids[: a.seq])
            if len(rows) == a.batch:
                break
    ids = torch.tensor(rows)
    tokens = ids.numel()

    def step():
        out = model(input_ids=ids)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        return loss.item()

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    def timed(fn, n):
        fn()  # warm-up
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    loss_sum = step()
    t_step = timed(step, a.steps)
    t_fwd = timed(forward, a.steps)
    print(json.dumps({
        "peer": f"torch {torch.__version__} + peft", "threads": a.threads, "batch": a.batch, "seq": a.seq,
        "loss_sum": loss_sum,
        "forward_backward_s": t_step, "forward_backward_tokens_per_s": tokens / t_step,
        "forward_s": t_fwd, "forward_tokens_per_s": tokens / t_fwd,
    }))


if __name__ == "__main__":
    main()
