#!/usr/bin/env python3
"""The engine's LoRA passes and PyTorch + PEFT's, interleaved one by one on the same cores.

Each round times one engine pass and one peer pass back to back (serve.py says why), and
the speed-up reported is the median over rounds of the two passes' ratio, next to each
side's median.

The engine side is `cargo bench --bench train_step -- --serve` (the command is given after
`--`), which answers one pass per line on stdin with its seconds. Both sides use the same
model, batch and threads (peer_setup.py, benches/common.rs). Prints a table, then one JSON
line.

Run: benches/peers/compare-train-step.sh --interleaved [--avx2]
"""
import argparse
import json
import statistics
import time

import torch

from peer_setup import default_assets, load, passes
from serve import PASSES, Engine, interleave

# The engine's bench runs on 2 threads (benches/common.rs THREADS); the peer gets as many.
THREADS = 2


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
    peer = passes(model, ids)
    peer_loss = peer["forward_backward"]()
    engine = Engine(cmd)
    ready = engine.ready

    def peer_pass(name):
        t = time.perf_counter()
        peer[name]()
        return time.perf_counter() - t

    both = interleave([engine.run, peer_pass], PASSES, a.rounds)
    engine.close()
    times = {name: {"engine": e, "peer": p} for name, (e, p) in both.items()}

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
          f"{'speed-up (median, min-max of rounds)':>38} {'of the medians':>15}")
    for name in PASSES:
        e, p = times[name]["engine"], times[name]["peer"]
        ratios = [pt / et for et, pt in zip(e, p)]
        em, pm, rm = statistics.median(e), statistics.median(p), statistics.median(ratios)
        # The goal's figure is the median of the rounds' ratios; the ratio of the two
        # medians beside it differs when rounds swing (1.48x against 1.59x in one run).
        print(f"{name:18} {em:9.3f} {pm:9.3f} {tokens / em:13.1f} "
              f"{rm:16.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) {pm / em:14.2f}x")
        result[name] = {"engine_s": e, "peer_s": p, "speedup_median": rm}
    # The products' FLOPs (the engine's count, cost::Flops: both sides run the same model,
    # batch and adapters) over each side's median time, against the cores' FMA peak at
    # the engine's SIMD level; absent from builds before the bench reported them.
    flops, peak = ready.get("flops"), ready.get("fma_peak_gflops")
    if flops and peak:
        print(f"the cores' FMA peak at {ready['simd']}: {peak:.1f} GFLOP/s")
        for name in PASSES:
            g = flops[name] / 1e9
            rates = [g / statistics.median(times[name][side]) for side in ("engine", "peer")]
            print(f"{name:18} {g:7.1f} GFLOP: engine {rates[0]:6.1f} GFLOP/s "
                  f"({100 * rates[0] / peak:.0f} % of the peak), torch {rates[1]:6.1f} "
                  f"({100 * rates[1] / peak:.0f} %)")
        result.update(flops=flops, fma_peak_gflops=peak)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
