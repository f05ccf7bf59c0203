#!/usr/bin/env python3
"""PyTorch + PEFT peer of benches/cuda.rs (cuda_llama1b_shape_8x1024/lora_forward_backward):
a Llama-3.2-1B-shaped model with random weights in bf16 on the GPU, PEFT LoRA r=16
alpha=32 on all seven projections, batch 8 x 1024 random tokens (issue 8's shape),
forward + backward of the summed token loss. Then PyTorch's SDPA flash attention at the shape of benches/cuda.rs's
cuda_attention_4x1024_h32_kv8_d64 (batch 4, 1024 positions, 32 query heads, 8 key/value
heads, head dim 64, causal, bf16): forward, and forward + backward of the summed output,
each the median of 20 calls timed with CUDA events after 5 warm-ups. Its flash kernel takes
key/value heads equal to the query heads, so K and V are repeated to 32 heads before the
timed calls (the compute is the same; it reads 4x the K/V bytes our GQA kernel reads).
Prints one JSON line (median seconds, tokens/s, the SDPA times).

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
        device, batch, warmup, timed = "cuda", (8, 1024), 3, 10
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
                      "forward_backward_s": s, "tokens_per_s": ids.numel() / s,
                      "sdpa": sdpa(smoke)}))


def sdpa(smoke):
    """Median milliseconds of SDPA's flash attention, forward and forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    f = torch.nn.functional.scaled_dot_product_attention
    if smoke:
        device, (b, t, h, kv, d), warmup, timed, backend = "cpu", (1, 32, 4, 2, 16), 1, 1, SDPBackend.MATH
    else:
        device, (b, t, h, kv, d), warmup, timed, backend = "cuda", (4, 1024, 32, 8, 64), 5, 20, SDPBackend.FLASH_ATTENTION
    q = torch.randn(b, h, t, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, kv, t, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    k = k.repeat_interleave(h // kv, dim=1).requires_grad_()
    v = v.repeat_interleave(h // kv, dim=1).requires_grad_()

    def forward():
        return f(q, k, v, is_causal=True)

    def forward_backward():
        forward().sum().backward()

    def median_ms(call):
        for _ in range(warmup):
            call()
        ts = []
        for _ in range(timed):
            if smoke:
                t0 = time.perf_counter()
                call()
                ts.append((time.perf_counter() - t0) * 1e3)
            else:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end))
        return statistics.median(ts)

    with sdpa_kernel([backend]), torch.no_grad():
        fwd = median_ms(forward)
    with sdpa_kernel([backend]):
        fwd_bwd = median_ms(forward_backward)
    return {"backend": backend.name.lower(), "shape": f"{b}x{t} h{h} kv{kv} d{d} causal, K/V repeated to {h} heads",
            "forward_ms": fwd, "forward_backward_ms": fwd_bwd}


if __name__ == "__main__":
    main()
