"""
easy-vqa (PyPI `easy-vqa`, 64x64 images of one coloured shape with templated questions) written
out in the conversation format of data/dataset.py, for every training stage:

    captions_{split}.json  stage 0/1  "<image>\\nDescribe the image." -> "a red circle"
    vqa_{split}.json       stage 2    the package's questions -> its one-word answers, with "type"
    mc_{split}.json                   the same questions as lettered multiple choice (the
                                      ScienceQA prompt of LLaVA), answer = the letter: eval.py
                                      --kind mc (SmolLM2-135M cannot map a known answer to its
                                      letter, see eval.py --letter-probe, so it is not stage 3's)
    choice_{split}.json    stage 3    a task the stage-2 data never asks: pick the image's
                                      colour-shape pair among four, answered with the option's
                                      text (choice_question); choice_train also replays as many
                                      stage-2 rows, so the adapter learns the task without
                                      forgetting the questions of stage 2
    yesno-balanced_{val,test}.json    the split's yes/no rows, balanced per question template
                                      (as many "yes" as "no" rows of each): a question-only
                                      model scores 50% on it, so it measures looking
    vqa-balanced_train.json  stage 2  the training questions with the yes/no rows balanced the
                                      same way (colour and shape rows unchanged): nothing is
                                      learned from the question alone on them

Splits: test = the package's test images; val = train images whose id is a multiple of 10
(a fixed 10%); train = the other train images. Images are not copied: paths are relative to the
package's own data folder, which is returned as "image_root".

Captions are our construction: easy-vqa has no captions, so each image's shape and colour are
read off its questions (open answers, and the shapes/colours that questions or positive yes/no
answers say are present). Images where neither is known get no caption; where one is known the
caption names only that ("a red shape", "a circle"). Stage 0's image-text matching reads
statements made from a complete caption (matching_statement): true, or with one attribute swapped.
"""
import argparse
import importlib.util
import json
import random
import re
from collections import defaultdict
from pathlib import Path

from weights.checkpoint import save_json
from weights.offline import cache_dir
from data.dataset import IMAGE, DataError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
CAPTION_PROMPT = "Describe the image."
CHOICE_INSTRUCTION = "Answer with the option's text."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGH"


# The file family each kind of run trains on: stage 0 and retrieval on captions, 1 captions,
# 2 open-ended VQA, 3 the choice task.
TRAINING_FILES = {0: "captions", 1: "captions", 2: "vqa", 3: "choice", "retrieval": "captions"}


def training_kind(train_cfg: dict) -> str:
    """The easy-vqa file family a run trains on (its train config as a dict)."""
    task = train_cfg.get("task", "vqa")
    return TRAINING_FILES[task if task == "retrieval" else train_cfg["stage"]]


def complete_captions(samples):
    """Captions naming both colour and shape: a partial one ("a red shape") would be a false
    negative for the complete caption of the same image in a contrastive batch."""
    words = set(COLORS) | set(SHAPES)
    return [s for s in samples if len(set(s.turns[0][1].split()) & words) == 2]


def matching_statement(caption: str, rng: random.Random) -> tuple[str, int]:
    """An image-text matching pair's text for an image with a complete caption ("a red
    circle"): a statement naming its colour ("a red shape"), its shape ("a circle") or both,
    true or (with one attribute swapped for another value) false, each with probability 1/2.
    -> (statement, 1 if true else 0). Ours: BLIP-2's ITM mines hard negatives from other
    captions; easy-vqa's questions ask about one attribute at a time, so we swap attributes."""
    _, color, shape = caption.split()
    kind, true = rng.choice(("color", "shape", "both")), rng.random() < 0.5
    if not true:
        swap = rng.choice(("color", "shape")) if kind == "both" else kind
        if swap == "color":
            color = rng.choice([c for c in COLORS if c != color])
        else:
            shape = rng.choice([s for s in SHAPES if s != shape])
    text = {"color": f"a {color} shape", "shape": f"a {shape}", "both": f"a {color} {shape}"}
    return text[kind], int(true)


def package_root() -> Path:
    """easy_vqa's data folder, found without importing the package."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise DataError("easy-vqa is not installed (pip install --no-deps easy-vqa==1.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def default_out_dir() -> Path:
    return cache_dir() / "easy-vqa"


def read_split(root: Path, split: str) -> tuple[dict[int, list[tuple[int, str, str]]], list[int]]:
    """(question index, question, answer) per question grouped by image id, and the image ids
    that have a file, from the package's questions.json and images/ folder."""
    questions = json.loads((root / split / "questions.json").read_text(encoding="utf-8"))
    image_ids = sorted(int(p.stem) for p in (root / split / "images").glob("*.png"))
    by_image = defaultdict(list)
    for index, (text, answer, image_id) in enumerate(questions):
        by_image[image_id].append((index, text, answer))
    return by_image, image_ids


def question_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "color"


def shape_and_color(questions) -> tuple[str | None, str | None]:
    """What an image's questions say it shows. A yes/no question names something present when
    the answer is yes to a plain question or no to a negated one ("is there not a red shape?")."""
    seen = set()
    for _, text, answer in questions:
        words = set(text.rstrip("?").split())
        if question_type(answer) != "yes/no":
            seen |= words | {answer}
        elif (answer == "yes") != is_negated(text):
            seen |= words
    shapes, colors = seen & set(SHAPES), seen & set(COLORS)
    if len(shapes) > 1 or len(colors) > 1:
        raise DataError(f"easy-vqa questions contradict each other: {sorted(shapes | colors)}")
    return next(iter(shapes), None), next(iter(colors), None)


def is_negated(question: str) -> bool:
    """Whether a yes/no question asks for absence: "is there not a red shape?", "is no circle
    present?" (8 of easy-vqa's 16 yes/no templates)."""
    return bool(set(question.rstrip("?").split()) & {"not", "no"})


def fewer_negated(rows: list[tuple[str, str]], share: float, seed: int = 0) -> list[int]:
    """Indices of the (question, answer) rows to keep so that negated yes/no questions make
    `share` of the yes/no rows (ours: stage 2's --negated-share), every other row kept. Each
    (template, answer) group of negated rows keeps the same fraction, so every template stays
    balanced and the question alone still predicts nothing. Why: on balanced rows the answer is
    *the image shows what the question names* XOR *the question is negated*; at half and half
    neither part alone predicts the answer (a parity problem), while with fewer negated rows
    the first does, so a design can learn it first and the negation on top."""
    negated, plain = defaultdict(list), 0
    for i, (question, answer) in enumerate(rows):
        if question_type(answer) != "yes/no":
            continue
        if is_negated(question):
            negated[question_template(question), answer].append(i)
        else:
            plain += 1
    n_negated = sum(len(group) for group in negated.values())
    fraction = min(1.0, share * plain / (1 - share) / max(n_negated, 1))
    rng, dropped = random.Random(seed), set()
    for key in sorted(negated):
        group = negated[key]
        dropped |= set(rng.sample(group, len(group) - round(fraction * len(group))))
    return [i for i in range(len(rows)) if i not in dropped]


def question_template(question: str) -> str:
    """The question with its colour and shape words replaced: 'is there not a {color} shape?'."""
    question = re.sub(rf"\b({'|'.join(COLORS)})\b", "{color}", question)
    return re.sub(rf"\b({'|'.join(SHAPES)})\b", "{shape}", question)


def balanced_yesno(rows: list[dict], seed: int = 0) -> list[dict]:
    """The yes/no rows, per question template as many "yes" as "no" (a seeded random choice
    of the more common answer's rows), in their original order."""
    by_answer = defaultdict(list)
    for i, r in enumerate(rows):
        answer = r["conversations"][1]["value"]
        if answer in ("yes", "no"):
            by_answer[question_template(r["conversations"][0]["value"]), answer].append(i)
    rng, keep = random.Random(seed), []
    for template in sorted({t for t, _ in by_answer}):
        yes, no = by_answer[template, "yes"], by_answer[template, "no"]
        n = min(len(yes), len(no))
        keep += rng.sample(yes, n) + rng.sample(no, n)
    return [rows[i] for i in sorted(keep)]


def balanced_vqa(rows: list[dict]) -> list[dict]:
    """The colour and shape rows and the balanced yes/no rows, in their original order."""
    yesno = {r["id"] for r in balanced_yesno(rows)}
    return [r for r in rows if r["type"] != "yes/no" or r["id"] in yesno]


def row(row_id: str, image: str, prompt: str, answer: str, **extra) -> dict:
    return {"id": row_id, "image": image, **extra, "conversations": [
        {"from": "human", "value": f"{IMAGE}\n{prompt}"}, {"from": "gpt", "value": answer}]}


def multiple_choice(row_id: str, question: str, answer: str) -> tuple[str, list[str], str]:
    """(prompt, options, letter). Yes/no: both in random order; shape: the 3 shapes; colour:
    the true colour and 3 others. Seeded by the row id, so every run writes the same file."""
    rng = random.Random(row_id)
    kind = question_type(answer)
    if kind == "yes/no":
        options = ["yes", "no"]
    elif kind == "shape":
        options = list(SHAPES)
    else:
        options = [answer] + rng.sample([c for c in COLORS if c != answer], 3)
    rng.shuffle(options)
    listed = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return f"{question}\nOptions: {listed}\n{MC_INSTRUCTION}", options, LETTERS[options.index(answer)]


def choice_question(row_id: str, color: str, shape: str) -> tuple[str, list[str], str]:
    """Stage 3's task: (prompt, options, answer). The options are the four pairs of two colours
    (the image's and another) and two shapes (the image's and another), in random order, so
    each option shares one attribute with two others: only the image tells them apart, and a
    model that does not look scores 25%. Seeded by the row id, as multiple_choice."""
    rng = random.Random(row_id)
    colors = [color, rng.choice([c for c in COLORS if c != color])]
    shapes = [shape, rng.choice([s for s in SHAPES if s != shape])]
    options = [f"a {c} {s}" for c in colors for s in shapes]
    rng.shuffle(options)
    listed = ", ".join(options[:-1]) + " or " + options[-1]
    return (f"Which of these is in the image: {listed}?\n{CHOICE_INSTRUCTION}", options,
            f"a {color} {shape}")


def with_replay(task: list[dict], replay: list[dict], seed: int = 0) -> list[dict]:
    """The task rows, then as many rows drawn (seeded) from the previous stage's."""
    return task + random.Random(seed).sample(replay, min(len(task), len(replay)))


def build_rows(root: Path) -> tuple[dict[str, dict[str, list]], dict[str, int]]:
    """All rows per file kind and split, and how many images lack a shape / colour / both."""
    known = set((root / "answers.txt").read_text(encoding="utf-8").split())
    if known != set(SHAPES) | set(COLORS) | {"yes", "no"}:
        raise DataError(f"{root}/answers.txt lists unexpected answers {sorted(known)}")
    rows = {kind: defaultdict(list) for kind in ("captions", "vqa", "mc", "choice")}
    gaps = {"no shape": 0, "no colour": 0, "neither (no caption)": 0}
    for package_split in ("train", "test"):
        by_image, image_ids = read_split(root, package_split)
        for image_id in image_ids:
            split = "test" if package_split == "test" else "val" if image_id % 10 == 0 else "train"
            image = f"{package_split}/images/{image_id}.png"
            shape, color = shape_and_color(by_image[image_id])
            gaps["no shape"] += shape is None
            gaps["no colour"] += color is None
            if shape or color:
                caption = " ".join(w for w in ("a", color, shape or "shape") if w)
                rows["captions"][split].append(row(f"{package_split}-{image_id}", image,
                                                   CAPTION_PROMPT, caption))
            else:
                gaps["neither (no caption)"] += 1
            if shape and color:
                row_id = f"{package_split}-{image_id}-choice"
                prompt, options, answer = choice_question(row_id, color, shape)
                rows["choice"][split].append(row(row_id, image, prompt, answer, type="choice",
                                                 options=options))
            for index, question, answer in by_image[image_id]:
                row_id = f"{package_split}-{image_id}-q{index}"
                kind = question_type(answer)
                rows["vqa"][split].append(row(row_id, image, question, answer, type=kind))
                prompt, options, letter = multiple_choice(row_id, question, answer)
                rows["mc"][split].append(row(row_id, image, prompt, letter, type=kind,
                                             options=options, answer_text=answer))
    rows["yesno-balanced"] = {split: balanced_yesno(rows["vqa"][split]) for split in ("val", "test")}
    rows["vqa-balanced"] = {"train": balanced_vqa(rows["vqa"]["train"])}
    rows["choice"]["train"] = with_replay(rows["choice"]["train"], rows["vqa-balanced"]["train"])
    return rows, gaps


def prepare_easyvqa(out_dir=None) -> dict[str, Path]:
    """Write the 15 files (idempotent: same content on every run; atomic writes) and return
    {"captions_train": path, ..., "yesno-balanced_test": path, "image_root": folder}."""
    root = package_root()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    rows, gaps = build_rows(root)
    print("easy-vqa images: " + ", ".join(f"{v} {k}" for k, v in gaps.items()))
    paths = {}
    for kind, splits in rows.items():
        for split in [s for s in ("train", "val", "test") if s in splits]:
            path = paths[f"{kind}_{split}"] = out_dir / f"{kind}_{split}.json"
            save_json(splits[split], path)
            print(f"{path}: {len(splits[split])} rows")
    paths["image_root"] = root
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write easy-vqa as conversation JSON files.")
    parser.add_argument("--out", help="output folder (default: $VLM_ADAPTERS_CACHE/easy-vqa "
                                      "or ~/.cache/vlm-adapters/easy-vqa)")
    prepare_easyvqa(parser.parse_args().out)
