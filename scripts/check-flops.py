#!/usr/bin/env python3
"""The FLOPs of an evaluation batch and a training micro-batch of the tiny GQA fixture,
counted by PyTorch's own FlopCounterMode (torch.utils.flop_counter: 2 per multiply-add of
every mm, addmm, bmm the ops dispatch, forward and backward) on HF transformers' Llama
with PEFT LoRA: the reference tests/flop_reference.rs holds the cost report's formulas
(src/cost.rs, `Flops`) to.

The run is made to do the work the engine's definitions count, so that the counts can be
compared; what differs is said, and the test accounts for it:
- the LM head runs over the labelled rows only (the positions with a next-token target),
  as the engine's fused classifier does; the loss is summed over them;
- the model's input embeddings require grad, so the backward runs to the first layer's
  input as the engine's does (PyTorch would skip it otherwise);
- attention is HF's eager path, whose two batched products per layer FlopCounterMode
  counts densely, over all T x T (query, key) pairs of every query head. The engine
  counts the causal pairs, T (T + 1) / 2 a sequence: the test scales the attention count
  by (T + 1) / (2 T). It is recorded apart from the rest (`attention`: the bmm counts;
  `linear`: the mm/addmm counts of the projections, LoRA and the head).
Padding: the batch is padded to its longest sequence with an attention mask; the padded
positions run through the body as the engine's do.

Cases: the fixture's adapter (r 4, all seven projections) and a fresh PEFT init (r 8,
q_proj and v_proj), each on the fixture's batch (6 x 24, no padding) and on the same
sequences cut to 24, 21, 18, 15, 12 and 9 tokens (padded).

Needs torch, transformers and peft (benches/peers/setup-venv.sh); not part of CI:
    python scripts/check-flops.py [OUT]   (default tests/fixtures/flop-reference.json)
"""
import json
import os
import sys

import peft
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(root, "tests", "fixtures", "tiny-gqa")
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "flop-reference.json")
CUTS = [24, 21, 18, 15, 12, 9]


def model_with(adapter):
    base = LlamaForCausalLM.from_pretrained(os.path.join(TINY, "model"), attn_implementation="eager",
                                            torch_dtype=torch.float32)
    if adapter == "fixture":
        m = peft.PeftModel.from_pretrained(base, os.path.join(TINY, "adapter"), is_trainable=True)
    else:
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        m = peft.get_peft_model(base, cfg)
    m.train()
    return m


def batch(cut):
    rows = [json.loads(line) for line in open(os.path.join(TINY, "batch.jsonl"))]
    if cut:
        rows = [{k: v[:n] for k, v in r.items()} for r, n in zip(rows, CUTS)]
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return ids, mask, labels


def split(counter):
    """(linear, attention): mm/addmm counts, bmm counts; anything else is an error."""
    ops = {str(k).split(".")[-1] if "." in str(k) else str(k): int(v)
           for k, v in counter.get_flop_counts()["Global"].items()}
    linear = sum(v for k, v in ops.items() if k in ("mm", "addmm"))
    attention = sum(v for k, v in ops.items() if k == "bmm")
    other = {k: v for k, v in ops.items() if k not in ("mm", "addmm", "bmm")}
    assert not other, f"ops the comparison does not expect: {other}"
    return linear, attention, ops


def run(m, ids, mask, labels, train):
    inner = m.base_model.model  # LlamaForCausalLM with the LoRA layers in place
    emb = inner.model.embed_tokens(ids).detach().requires_grad_(train)
    # The next-token targets of positions 0..T-2, and the labelled ones among them.
    targets = labels[:, 1:]
    keep = targets != -100
    with FlopCounterMode(display=False) as counter:
        hidden = inner.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        logits = inner.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        if train:
            loss.backward()
    linear, attention, ops = split(counter)
    return {"linear": linear, "attention": attention, "ops": ops, "loss_sum": float(loss)}


cases = []
for adapter in ["fixture", "fresh-r8-qv"]:
    for cut in [False, True]:
        ids, mask, labels = batch(cut)
        m = model_with(adapter)
        case = {
            "adapter": adapter,
            "cut": CUTS if cut else None,
            "batch": list(ids.shape),
            "n_targets": int((labels[:, 1:] != -100).sum()),
            "eval": run(m, ids, mask, labels, train=False),
            "train": run(m, ids, mask, labels, train=True),
        }
        cases.append(case)
        print(adapter, "cut" if cut else "full", case["batch"], "eval", case["eval"]["linear"],
              case["eval"]["attention"], "train", case["train"]["linear"], case["train"]["attention"])

out = {
    "what": "FlopCounterMode counts of the tiny GQA fixture's evaluation and training micro-batch "
            "(scripts/check-flops.py); attention is the dense count of eager attention's bmm",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "cases": cases,
}
with open(OUT, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
print("wrote", OUT)
