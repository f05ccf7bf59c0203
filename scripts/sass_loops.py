#!/usr/bin/env python3
"""The loops of one kernel entry in an nvdisasm listing, with their instructions counted
by opcode: where a kernel's issue slots go, read without a GPU (scripts/sass-report.sh).

A loop is the code from a label to a branch back to it; nested loops are each listed.
Counts are static: every instruction of the body once, whichever path a thread takes, so
a body with guarded and unguarded forms counts both. Only loops that hold mma (HMMA) or
local-memory spills (STL/LDL) are listed.

Usage: sass_loops.py LISTING ENTRY
"""
import re
import sys


def entry_lines(listing, entry):
    lines = open(listing).read().split("\n")
    head = ".text." + entry + ":"
    try:
        start = lines.index(head)
    except ValueError:
        sys.exit(f"{listing}: no entry {entry}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(".text.")), len(lines))
    return lines[start:end]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().split("\n")[-1])
    lines = entry_lines(sys.argv[1], sys.argv[2])
    ins, label_at, pending = [], {}, []
    for line in lines:
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            pending.append(label.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            for p in pending:
                label_at[p] = addr
            pending = []
            ins.append((addr, m.group(2).strip()))
    print(f"{sys.argv[2]}: {len(ins)} instructions")
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:\S+,\s+)?`?\(?(\.L_x_\d+)", text)
        if not m or m.group(1) not in label_at or label_at[m.group(1)] >= addr:
            continue
        lo = label_at[m.group(1)]
        ops = {}
        for a, t in ins:
            if lo <= a <= addr:
                op = re.sub(r"^@!?U?P[T\d]+\s+", "", t).split()[0].split(".")[0]
                ops[op] = ops.get(op, 0) + 1
        if ops.get("HMMA") or ops.get("STL") or ops.get("LDL"):
            body = sum(ops.values())
            top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:14])
            print(f"  loop {lo:#x}-{addr:#x}: {body} instructions: {top}")


if __name__ == "__main__":
    main()
