#!/usr/bin/env python3
"""PyTorch + PEFT peer of benches/cuda.rs (cuda_llama1b_shape_4x512/lora_forward_backward):
a Llama-3.2-1B-shaped model with random weights in bf16 on the GPU, PEFT LoRA r=16
alpha=32 on all seven projections, batch 4 x 512 random tokens, forward + backward of the
summed token loss. Prints one JSON line (median seconds, tokens/s)."""
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                      tie_word_embeddings=True, max_position_embeddings=131072)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    ids = torch.randint(0, cfg.vocab_size, (4, 512), device="cuda")

    def step():
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    s = statistics.median(ts)
    print(json.dumps({"peer": f"torch {torch.__version__} + peft, bf16", "device": torch.cuda.get_device_name(),
                      "forward_backward_s": s, "tokens_per_s": ids.numel() / s}))


if __name__ == "__main__":
    main()
