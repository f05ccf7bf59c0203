#!/usr/bin/env python3
"""Two builds of the engine, interleaved pass by pass on the same cores: is a change faster?

On a machine whose speed drifts by 10-30 % over tens of seconds (a shared VM), two
criterion runs one after the other cannot show a 5 % change. Here each round times one pass
of build A and one of build B back to back (the order alternating between rounds), and the
median over rounds of their ratio is reported. Each side is a `train_step` bench binary in
`--serve` mode (benches/train_step.rs), for example:

  cargo bench --bench train_step --no-run      # prints the binary's path; copy it to A
  ... change the code, build again: B ...
  python3 benches/ab.py --rounds 12 A B

Prints a table of medians and the ratio A/B (above 1: B is faster).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

PASSES = ("forward_backward", "forward")
SETTLE_S = 0.3  # idle before each pass, so the other side's threads have stopped spinning


def start(binary):
    p = subprocess.Popen([binary, "--bench", "--serve"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)

    def answer():
        line = p.stdout.readline()
        if not line:
            sys.exit(f"ab.py: {binary} exited early (its stderr is above)")
        return line
    ready = json.loads(answer())

    def run(name):
        p.stdin.write(name + "\n")
        p.stdin.flush()
        return float(answer())
    return p, ready, run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args()
    passes = args.passes.split(",")
    sides = [start(args.a), start(args.b)]
    for (_, ready, _), name in zip(sides, "AB"):
        print(f"{name}: {ready['simd']}, loss {ready['loss_sum']:.4f}")
    for name in passes:  # warm-up
        for _, _, run in sides:
            run(name)
    times = {name: ([], []) for name in passes}
    for r in range(args.rounds):
        for name in passes:
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                time.sleep(SETTLE_S)
                times[name][i].append(sides[i][2](name))
    for p, _, _ in sides:
        p.stdin.close()
        p.wait()
    print(f"{'':18} {'A s':>8} {'B s':>8} {'A/B (median, min-max of rounds)':>34}")
    for name in passes:
        a, b = times[name]
        ratios = [x / y for x, y in zip(a, b)]
        print(f"{name:18} {statistics.median(a):8.3f} {statistics.median(b):8.3f} "
              f"{statistics.median(ratios):14.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
