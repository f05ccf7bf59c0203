#!/usr/bin/env python3
"""Check that PEFT loads the engine's adapters unchanged: the engine trains a LoRA
adapter on the tiny fixture model (so B != 0), PEFT loads it with
PeftModel.from_pretrained, and PEFT's summed loss and LoRA gradients on the fixture batch
must equal what `lalora-engine grad` reports for the same adapter (relative error < 1e-4).

Run with the peer venv: benches/peers/.venv/bin/python scripts/check-peft-interop.py
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
engine = os.path.join(root, "target/release/lalora-engine")
tiny = os.path.join(root, "tests/fixtures/tiny-gqa")

with tempfile.TemporaryDirectory() as d:
    adapter, grads = os.path.join(d, "adapter"), os.path.join(d, "grad.safetensors")
    subprocess.run([engine, "train", "--model", f"{tiny}/model", "--data", f"{tiny}/batch.jsonl", "--steps", "3",
                    "--batch-size", "3", "--rank", "4", "--alpha", "8", "--checkpoint-every", "0", "--out", adapter,
                    "--quiet", "--device", "cpu"], check=True)
    subprocess.run([engine, "grad", "--model", f"{tiny}/model", "--adapter", adapter, "--data", f"{tiny}/batch.jsonl",
                    "--out", grads, "--quiet", "--device", "cpu"], check=True)
    ours = load_file(grads)
    model = AutoModelForCausalLM.from_pretrained(f"{tiny}/model", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    rows = [json.loads(l) for l in open(f"{tiny}/batch.jsonl")]
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             reduction="sum", ignore_index=-100)
    loss.backward()
    worst = abs(loss.item() - ours["loss_sum"].item()) / abs(loss.item())
    n = 0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        key = "grad." + name.replace(".default.weight", ".weight")
        g = ours[key]
        worst = max(worst, ((p.grad - g).norm() / p.grad.norm()).item())
        n += 1
    print(f"PEFT loaded the engine's adapter: {n} LoRA tensors, loss_sum {loss.item():.6f} vs {ours['loss_sum'].item():.6f}, "
          f"worst relative error {worst:.2e}")
    sys.exit(0 if n == 28 and worst < 1e-4 else 1)
