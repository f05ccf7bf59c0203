#!/usr/bin/env python3
"""Peers of benches/curvature.rs on the same model, batch and threads (peer_setup.py):
- lora_forward_backward: PyTorch + PEFT forward + backward of the summed loss;
- diag_loop: the diagonal empirical Fisher by a loop over sequences (one backward per
  sequence, gradients squared and summed);
- diag_backpack: BackPACK's SumGradSquared on the LoRA layers (one backward);
- kfac_curvlinops: curvlinops' KFACLinearOperator (empirical Fisher, expand) on the LoRA
  layers.
Prints one JSON line of median seconds per batch.
"""
import argparse
import json

import torch

from peer_setup import default_assets, load, summed_loss, timed


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=default_assets())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["kfac"], help="run only this peer")
    a = ap.parse_args()
    model, ids = load(a.assets, a.threads)
    params = lora_params(model)
    out = {"peer": f"torch {torch.__version__}", "threads": a.threads, "batch": ids.shape[0], "seq": ids.shape[1]}

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        summed_loss(model, ids).backward()

    def diag_loop():
        fisher = [torch.zeros_like(p) for p in params]
        for n in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            summed_loss(model, ids[n:n + 1]).backward()
            for f, p in zip(fisher, params):
                f += p.grad ** 2
        return fisher

    if a.only is None:
        out["lora_forward_backward_s"] = timed(fwd_bwd, a.repeats)
        out["diag_loop_s"] = timed(diag_loop, a.repeats)

    try:
        if a.only is not None:
            raise RuntimeError("skipped")
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ("lora_A" in name or "lora_B" in name):
                extend(m)

        def diag_backpack():
            model.zero_grad(set_to_none=True)
            with backpack(SumGradSquared()):
                summed_loss(model, ids).backward()
            return [p.sum_grad_squared for p in params]

        out["diag_backpack_s"] = timed(diag_backpack, a.repeats)
    except Exception as e:  # noqa: BLE001 - report why the peer could not run
        out["diag_backpack_error"] = f"{type(e).__name__}: {e}"[:300]

    try:
        from curvlinops import KFACLinearOperator

        class Logits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                z = self.m(input_ids=x).logits[:, :-1]
                return z.reshape(-1, z.shape[-1])

        wrapped = Logits(model)
        data = [(ids, ids[:, 1:].reshape(-1))]
        loss = torch.nn.CrossEntropyLoss(reduction="sum")

        def kfac():
            op = KFACLinearOperator(wrapped, loss, params, data, fisher_type="empirical",
                                    kfac_approx="expand", check_deterministic=False, progressbar=False)
            op.compute_kronecker_factors()  # the constructor defers this
            return op

        out["kfac_curvlinops_s"] = timed(kfac, a.repeats)
    except Exception as e:  # noqa: BLE001 - report why the peer could not run
        out["kfac_curvlinops_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
