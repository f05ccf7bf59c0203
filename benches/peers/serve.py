"""Shared by interleaved.py and ab.py: the engine's `train_step -- --serve` bench as a
child process that runs one pass per request, and the interleaved timing loop.

Why interleave: on a machine whose speed drifts by 10-30 % over tens of seconds (a shared
VM), timing one side for minutes and then the other lets a slow spell fall on one side
only. Each round here times one pass of every side back to back, the order reversed
every other round, after an idle pause, so that neither side's worker threads still spin
from the other's pass (OpenMP and rayon both spin a while before they sleep).
"""
import json
import subprocess
import sys
import time

PASSES = ("forward_backward", "forward")
SETTLE_S = 0.3


class Engine:
    """A `--serve` bench: `ready` is its first line (SIMD level, loss on the batch);
    `run(name)` times one pass in the child and returns its seconds."""

    def __init__(self, cmd):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.ready = json.loads(self._answer())

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"{' '.join(self.cmd)} exited early (its stderr is above)")
        return line

    def run(self, name):
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return float(self._answer())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def interleave(sides, passes, rounds):
    """`sides`: functions `name -> seconds`. After one warm-up pass each, `rounds` rounds
    of every pass on every side; returns `{pass: [seconds per round] per side}`."""
    for name in passes:
        for run in sides:
            run(name)
    times = {name: [[] for _ in sides] for name in passes}
    for r in range(rounds):
        for name in passes:
            order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
            for i in order:
                time.sleep(SETTLE_S)
                times[name][i].append(sides[i](name))
    return times
