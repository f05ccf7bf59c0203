#!/usr/bin/env python3
"""The engine's LoRA passes and PyTorch + PEFT's, interleaved one by one on the same cores.

Why: on a shared machine (a VM beside other tenants) the speed of the cores drifts by 10-30 %
over tens of seconds, and `compare-train-step.sh` times the engine for minutes and then the
peer, so a slow spell lands on one side only. Here each round times one engine pass and one
peer pass back to back (the order alternating between rounds), and the speed-up reported
is the median over rounds of the two passes' ratio, next to each side's median.

The engine side is `cargo bench --bench train_step -- --serve` (the command is given after
`--`), which answers one pass per line on stdin with its seconds. Both sides use the same
model, batch and threads (peer_setup.py, benches/common.rs). Prints a table, then one JSON
line.

Run: benches/peers/compare-train-step.sh --interleaved [--avx2]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from peer_setup import default_assets, load, summed_loss

PASSES = ("forward_backward", "forward")
# The engine's bench runs on 2 threads (benches/common.rs THREADS); the peer gets as many.
THREADS = 2
# Idle time before each timed pass, so neither side's worker threads still spin from the
# other's pass (OpenMP and rayon both spin a while before they sleep).
SETTLE_S = 0.3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=default_assets())
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("engine", nargs=argparse.REMAINDER, help="-- the engine's --serve command")
    a = ap.parse_args()
    cmd = a.engine[1:] if a.engine[:1] == ["--"] else a.engine
    if not cmd:
        ap.error("give the engine's --serve command after --")

    model, ids = load(a.assets, THREADS)

    def forward_backward():
        loss = summed_loss(model, ids)
        loss.backward()
        return loss.item()

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    peer = {"forward_backward": forward_backward, "forward": forward}
    engine = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer():
        line = engine.stdout.readline()
        if not line:
            sys.exit(f"interleaved.py: the engine ({' '.join(cmd)}) exited early (its stderr is above)")
        return line
    ready = json.loads(answer())

    def engine_pass(name):
        engine.stdin.write(name + "\n")
        engine.stdin.flush()
        return float(answer())

    def peer_pass(name):
        t = time.perf_counter()
        peer[name]()
        return time.perf_counter() - t

    peer_loss = forward_backward()  # also the peer's warm-up of the backward
    forward()
    for name in PASSES:
        engine_pass(name)

    times = {name: {"engine": [], "peer": []} for name in PASSES}
    for r in range(a.rounds):
        for name in PASSES:
            sides = [("engine", engine_pass), ("peer", peer_pass)]
            for side, run in sides if r % 2 == 0 else sides[::-1]:
                time.sleep(SETTLE_S)
                times[name][side].append(run(name))
    engine.stdin.close()
    engine.wait()

    tokens = ids.numel()
    result = {
        "engine_simd": ready["simd"], "engine_loss_sum": ready["loss_sum"],
        "peer": f"torch {torch.__version__} + peft",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "peer_loss_sum": peer_loss,
        "threads": THREADS, "batch": ids.shape[0], "seq": ids.shape[1], "rounds": a.rounds,
    }
    print(f"engine {ready['simd']}, loss {ready['loss_sum']:.2f}; peer {result['peer']}, "
          f"CPU capability {result['cpu_capability']}, loss {peer_loss:.3f}; "
          f"{THREADS} threads, {a.rounds} interleaved rounds")
    print(f"{'':18} {'engine s':>9} {'torch s':>9} {'engine tok/s':>13} "
          f"{'speed-up (median, min-max of rounds)':>38}")
    for name in PASSES:
        e, p = times[name]["engine"], times[name]["peer"]
        ratios = [pt / et for et, pt in zip(e, p)]
        em, pm, rm = statistics.median(e), statistics.median(p), statistics.median(ratios)
        print(f"{name:18} {em:9.3f} {pm:9.3f} {tokens / em:13.1f} "
              f"{rm:16.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        result[name] = {"engine_s": e, "peer_s": p, "speedup_median": rm}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
