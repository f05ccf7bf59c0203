#!/usr/bin/env python3
"""The learning rate each optimiser step uses under transformers' schedules with warm-up
(get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup,
get_constant_schedule_with_warmup), read from a torch AdamW's param group before each
step, as a Trainer run steps them: the reference fixture tests/lr_schedule.rs holds
`TrainConfig::lr_at` to.

Needs torch and transformers (benches/peers/setup-venv.sh); not part of CI:
    python scripts/check-lr-schedule.py [OUT]   (default tests/fixtures/lr-schedules.json)
"""
import json
import os
import sys

import torch
import transformers
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKERS = {
    "cosine": lambda o, w, n: get_cosine_schedule_with_warmup(o, w, n),
    "linear": lambda o, w, n: get_linear_schedule_with_warmup(o, w, n),
    "constant": lambda o, w, n: get_constant_schedule_with_warmup(o, w),
}
CASES = [(10, 3, 1e-3), (10, 0, 1e-3), (7, 1, 2e-4), (5, 5, 1e-2)]


def lrs(schedule, steps, warmup, lr):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = MAKERS[schedule](opt, warmup, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests/fixtures/lr-schedules.json")
    cases = [{"schedule": s, "steps": n, "warmup": w, "lr": lr, "lrs": lrs(s, n, w, lr)}
             for s in MAKERS for n, w, lr in CASES]
    result = {"made_with": f"torch {torch.__version__}, transformers {transformers.__version__}",
              "cases": cases}
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
