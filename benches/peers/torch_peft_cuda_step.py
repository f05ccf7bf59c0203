#!/usr/bin/env python3
"""PyTorch + PEFT peer of benches/cuda.rs (cuda_llama1b_shape_4x512/lora_forward_backward):
a Llama-3.2-1B-shaped model with random weights in bf16 on the GPU, PEFT LoRA r=16
alpha=32 on all seven projections, batch 4 x 512 random tokens, forward + backward of the
summed token loss. Prints one JSON line (median seconds, tokens/s).

`--smoke`: the same code on the CPU at a tiny shape (2 layers, hidden 64, vocab 300,
batch 2 x 16, one timed step), to check here, before a GPU session, that the script runs
with the installed torch, transformers and PEFT. Not a figure."""
import json
import sys
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    smoke = "--smoke" in sys.argv[1:]
    torch.manual_seed(0)
    if smoke:
        device, batch, warmup, timed = "cpu", (2, 16), 1, 1
        cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
                          tie_word_embeddings=True, max_position_embeddings=64)
    else:
        device, batch, warmup, timed = "cuda", (4, 512), 3, 10
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                          tie_word_embeddings=True, max_position_embeddings=131072)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    ids = torch.randint(0, cfg.vocab_size, batch, device=device)

    def step():
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        if not smoke:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    ts = []
    for _ in range(timed):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    s = statistics.median(ts)
    where = "cpu (smoke: not a figure)" if smoke else torch.cuda.get_device_name()
    print(json.dumps({"peer": f"torch {torch.__version__} + peft, bf16", "device": where,
                      "forward_backward_s": s, "tokens_per_s": ids.numel() / s}))


if __name__ == "__main__":
    main()
