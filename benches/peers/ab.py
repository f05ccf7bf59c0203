#!/usr/bin/env python3
"""Two builds of the engine, interleaved pass by pass on the same cores: is a change faster?

Two criterion runs one after the other cannot show a 5 % change on a machine whose speed
drifts (serve.py says why). Here each round times one pass of build A and one of build B
back to back, and the median over rounds of their ratio is reported. Each side is a
`train_step` bench binary, run in `--serve` mode (benches/train_step.rs), for example:

  cargo bench --bench train_step --no-run      # prints the binary's path; copy it to A
  ... change the code, build again: B ...
  python3 benches/peers/ab.py --rounds 12 A B

Needs no peer packages. Prints a table of medians and the ratio A/B (above 1: B is faster).
"""
import argparse
import statistics

from serve import PASSES, Engine, interleave


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args()
    passes = args.passes.split(",")
    engines = [Engine([path, "--bench", "--serve"]) for path in (args.a, args.b)]
    for e, name in zip(engines, "AB"):
        print(f"{name}: {e.ready['simd']}, loss {e.ready['loss_sum']:.4f}")
    times = interleave([e.run for e in engines], passes, args.rounds)
    for e in engines:
        e.close()
    print(f"{'':18} {'A s':>8} {'B s':>8} {'A/B (median, min-max of rounds)':>34}")
    for name in passes:
        a, b = times[name]
        ratios = [x / y for x, y in zip(a, b)]
        print(f"{name:18} {statistics.median(a):8.3f} {statistics.median(b):8.3f} "
              f"{statistics.median(ratios):14.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    # Each build's products per second against the cores' FMA peak, where its bench
    # reports them (older builds do not).
    for side, (e, name) in enumerate(zip(engines, "AB")):
        flops, peak = e.ready.get("flops"), e.ready.get("fma_peak_gflops")
        if flops and peak:
            rates = {p: flops[p] / 1e9 / statistics.median(times[p][side]) for p in passes}
            print(f"{name}: FMA peak {peak:.1f} GFLOP/s; " + ", ".join(
                f"{p} {r:.1f} GFLOP/s ({100 * r / peak:.0f} %)" for p, r in rates.items()))


if __name__ == "__main__":
    main()
