#!/usr/bin/env python3
"""PyTorch + PEFT peer of benches/train_step.rs: LoRA forward+backward on SmolLM2-135M on
the engine's benchmark batch (peer_setup.py), same threads. Prints one JSON line.

Run: benches/peers/setup-venv.sh && benches/peers/.venv/bin/python benches/peers/torch_peft_step.py
"""
import argparse
import json

import torch

from peer_setup import default_assets, load, passes, timed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=default_assets())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    model, ids = load(a.assets, a.threads)
    p = passes(model, ids)
    step, forward = p["forward_backward"], p["forward"]

    loss_sum = step()
    t_step = timed(step, a.steps)
    t_fwd = timed(forward, a.steps)
    tokens = ids.numel()
    print(json.dumps({
        "peer": f"torch {torch.__version__} + peft",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": a.threads, "batch": ids.shape[0], "seq": ids.shape[1],
        "loss_sum": loss_sum,
        "forward_backward_s": t_step, "forward_backward_tokens_per_s": tokens / t_step,
        "forward_s": t_fwd, "forward_tokens_per_s": tokens / t_fwd,
    }))


if __name__ == "__main__":
    main()
