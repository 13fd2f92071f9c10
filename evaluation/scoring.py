"""
Scoring answers: normalised exact match (the VQA convention, simplified), option letters
extracted from free text, accuracy overall and per question type, multiple-choice rows and their
options, and retrieval recall@K with several right candidates.
"""
import math
import re
import string
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F

ARTICLES = {"a", "an", "the"}
MC_LETTERS = "ABCDE"


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the VQA convention, simplified)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ARTICLES)


def extract_letter(text: str, n_options: int = 26) -> str | None:
    """The chosen option's letter, or None. Accepted: a bare letter ('B', 'b', '(b)', 'B.'),
    a capital letter followed by '.', ':', ')' or ',' ('B) red', 'B. red'), a parenthesised
    capital with anything after ('(B) red'), and 'the answer is B' anywhere. Refused on
    purpose: words that start with a capital letter ('Because', 'A red circle': the article
    'A' is not option A), and lower-case letters inside longer text ('the answer is a dog')."""
    letters = string.ascii_uppercase[:n_options]
    bare = re.fullmatch(rf"\s*\(?([{letters}])\)?\.?\s*", text, flags=re.IGNORECASE)
    if bare:
        return bare.group(1).upper()
    m = re.match(rf"\s*(?:\(([{letters}])\)|([{letters}])[.:),])", text) or \
        re.search(rf"(?i:answer is):?\s*\(?([{letters}])\b", text)
    return next(g for g in m.groups() if g) if m else None


def score_answers(samples, predictions, multiple_choice=False) -> dict:
    """Accuracy overall and per question type (sample.extra["type"] when present). Each
    sample's last turn is the one answered (the earlier ones are its history, see
    data.dataset.turn_samples)."""
    hits, counts = defaultdict(int), defaultdict(int)
    for sample, pred in zip(samples, predictions):
        truth = sample.turns[-1][1]
        ok = extract_letter(pred) == truth.strip() if multiple_choice else \
            normalize_answer(pred) == normalize_answer(truth)
        kind = sample.extra.get("type")
        for key in ["all"] + ([kind] if kind else []):
            hits[key] += ok
            counts[key] += 1
    return {"accuracy": round(hits["all"] / max(1, counts["all"]), 4), "n": counts["all"],
            **{f"accuracy_{k}": round(hits[k] / counts[k], 4) for k in sorted(counts) if k != "all"}}


def question_only_answers(train, samples) -> list[str]:
    """The question-only ("blind") baseline: each sample's last question gets the answer its
    exact text most often has in `train` (samples, first turns), or the most common answer
    there when the text never occurs. Scored on the same rows as a model, it is what the
    language prior alone earns there."""
    answers = defaultdict(Counter)
    for sample in train:
        answers[sample.turns[0][0]][sample.turns[0][1]] += 1
    overall = Counter(s.turns[0][1] for s in train).most_common(1)[0][0]
    return [answers[s.turns[-1][0]].most_common(1)[0][0] if s.turns[-1][0] in answers else overall
            for s in samples]


def recall_at_k(sim: torch.Tensor, truth: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Retrieval recall: sim (Nq, Nc) query-candidate scores; truth the right candidates, either
    (Nq,) one index per query or an (Nq, Nc) bool mask (one or more per query: a hit at K is any
    right one in the top K). A query's rank is 1 + the number of wrong candidates scoring >= its
    best right one, so ties count pessimistically (a constant scorer gets R@1 = 0, not a lucky
    1), while other right candidates never push it down."""
    if truth.dim() == 1:
        truth = F.one_hot(truth, sim.shape[1]).bool()       # (Nq, Nc)
    if not truth.any(1).all():
        raise ValueError("recall_at_k: a query has no right candidate")
    best = sim.masked_fill(~truth, -math.inf).amax(1, keepdim=True)    # (Nq, 1)
    rank = 1 + ((sim >= best) & ~truth).sum(1)                          # (Nq,), 1 = best
    return {f"R@{k}": round(float((rank <= k).float().mean()), 4) for k in ks}


def is_multiple_choice(sample) -> bool:
    answer = sample.turns[-1][1].strip()
    return len(answer) == 1 and answer in MC_LETTERS


def option_texts(sample) -> list[str]:
    """A multiple-choice row's options: its "options" field, else parsed from "(A) x (B) y" in
    the question answered (the last turn's)."""
    if sample.extra.get("options"):
        return list(sample.extra["options"])
    found = re.findall(r"\(([A-E])\)\s*(.+?)(?=\s*\([A-E]\)|\n|$)", sample.turns[-1][0])
    return [text.strip() for _, text in found]


def question_stem(question: str) -> str:
    """The question without its option list and answer-format instruction."""
    return question.split("\nOptions:")[0].split("\nAnswer with")[0]
