"""
Evaluation: answer accuracy on a run's test split, and one question about your own image.

    python eval.py --checkpoint runs/crome/stage2                 # easy-vqa test split
    python eval.py --checkpoint runs/crome/stage2 --image photo.png --prompt "What shape is this?"

Metrics: open-ended answers by normalised exact match (per question type when the data has a
"type" field); multiple choice by the letter extracted from the answer.
"""
import re
import string
from collections import defaultdict

ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the VQA convention, simplified)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ARTICLES)


def extract_letter(text: str, n_options: int = 26) -> str | None:
    """The chosen option's letter from an answer like 'B', '(B)', 'B) red' or 'The answer is B.'."""
    letters = string.ascii_uppercase[:n_options]
    m = re.match(rf"\s*\(?([{letters}])\)?(?:[\s.:)]|$)", text) or \
        re.search(rf"answer is \(?([{letters}])\b", text)
    return m.group(1) if m else None


def score_answers(samples, predictions, multiple_choice=False) -> dict:
    """Accuracy overall and per question type (sample.type when present)."""
    hits, counts = defaultdict(int), defaultdict(int)
    for sample, pred in zip(samples, predictions):
        truth = sample.turns[0][1]
        ok = extract_letter(pred) == truth.strip() if multiple_choice else \
            normalize_answer(pred) == normalize_answer(truth)
        kind = sample.extra.get("type")
        for key in ["all"] + ([kind] if kind else []):
            hits[key] += ok
            counts[key] += 1
    return {"accuracy": round(hits["all"] / max(1, counts["all"]), 4), "n": counts["all"],
            **{f"accuracy_{k}": round(hits[k] / counts[k], 4) for k in sorted(counts) if k != "all"}}
