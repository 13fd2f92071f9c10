import json
import random
from collections import defaultdict
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data.collate import ImageCache, shared_prefix
from data.dataset import DataError, captions, load_conversations, load_image, turn_samples
from data.easyvqa import (COLORS, LETTERS, SHAPES, TRAINING_FILES, choice_question,
                          fewer_negated, is_negated, matching_statement, multiple_choice,
                          package_root, prepare_easyvqa, question_template, shape_and_color)
from data.renders import COLOR_RGB, IMAGE_SIZES, prepare_renders
from image_processor import ImageProcessor, random_view, turned

KINDS, SPLITS = ("captions", "vqa", "mc", "choice"), ("train", "val", "test")


# ---- the easy-vqa converter, on the real package ----------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_easyvqa(tmp_path_factory.mktemp("easy-vqa"))


@pytest.fixture(scope="module")
def rows(prepared):
    return {(k, s): json.loads(prepared[f"{k}_{s}"].read_text()) for k in KINDS for s in SPLITS}


@pytest.fixture(scope="module")
def package_questions():
    """image path -> [(question, answer)], straight from the package's questions.json files."""
    by_image = defaultdict(list)
    for split in ("train", "test"):
        for text, answer, image_id in json.loads((package_root() / split / "questions.json").read_text()):
            by_image[f"{split}/images/{image_id}.png"].append((text, answer))
    return by_image


def test_counts_and_splits(prepared, rows):
    assert prepared["image_root"] == package_root()
    images = {(k, s): {r["image"] for r in rows[k, s]} for k in KINDS for s in SPLITS}
    assert sum(len(rows["vqa", s]) for s in SPLITS) == 38575 + 9673  # every package question
    assert len(rows["vqa", "test"]) == 9673
    assert len(images["vqa", "test"]) == 1000 and len(images["vqa", "val"]) == 400
    assert all(i.startswith("test/") for i in images["vqa", "test"])
    for s in SPLITS:
        assert images["mc", s] == images["vqa", s]
        assert images["captions", s] <= images["vqa", s]
        assert {r["image"] for r in rows["choice", s] if r["type"] == "choice"} <= images["captions", s]
        assert len(images["captions", s]) == len(rows["captions", s])  # one caption per image
        assert len(rows["captions", s]) > 0.95 * len(images["vqa", s])
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not images["vqa", a] & images["vqa", b]


def test_every_row_loads(prepared, rows):
    for k in KINDS:
        for s in SPLITS:
            samples, skipped = load_conversations(prepared[f"{k}_{s}"], prepared["image_root"])
            assert skipped == [] and len(samples) == len(rows[k, s])
    assert samples[0].image.is_file() and samples[0].image_first


def test_captions_match_question_answers(rows, package_questions):
    for row in rows["captions", "test"][:50] + rows["captions", "train"][-50:]:
        caption = row["conversations"][1]["value"].split()
        assert caption[0] == "a" and caption[-1] in SHAPES + ("shape",)
        for text, answer in package_questions[row["image"]]:
            if answer in SHAPES or answer in COLORS:
                assert answer in caption, (row["image"], text, answer, caption)


def test_vqa_types_and_answers(rows, package_questions):
    for row in rows["vqa", "val"]:
        question = row["conversations"][0]["value"].removeprefix("<image>\n")
        answer = row["conversations"][1]["value"]
        assert (question, answer) in package_questions[row["image"]]
        expected = "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "color"
        assert row["type"] == expected
    assert {r["type"] for r in rows["vqa", "val"]} == {"yes/no", "shape", "color"}


@pytest.mark.parametrize("split", ["val", "test"])
def test_balanced_yesno_subset_defeats_a_question_only_model(prepared, rows, split):
    """Every yes/no template has as many "yes" as "no" rows, the rows are the split's own, and
    the question-only baselines, trained on the train split (the majority answer per exact
    question and per template), score exactly 50% there, against over 80% on all yes/no rows."""
    balanced = json.loads(prepared[f"yesno-balanced_{split}"].read_text())
    qa = lambda r: (r["conversations"][0]["value"], r["conversations"][1]["value"])  # noqa: E731
    counts = defaultdict(lambda: {"yes": 0, "no": 0})
    for r in balanced:
        question, answer = qa(r)
        counts[question_template(question)][answer] += 1
    assert len(counts) == 16 and all(c["yes"] == c["no"] >= 20 for c in counts.values())
    vqa = rows["vqa", split]
    assert {r["id"] for r in balanced} <= {r["id"] for r in vqa}
    majority = defaultdict(lambda: defaultdict(int))
    for r in rows["vqa", "train"]:
        question, answer = qa(r)
        majority[question][answer] += 1
        majority[question_template(question)][answer] += 1

    def blind(rows_, key):
        picks = [max(majority[key(qa(r)[0])].items(), key=lambda kv: kv[1])[0] for r in rows_]
        return sum(p == qa(r)[1] for p, r in zip(picks, rows_)) / len(rows_)
    yes_no = [r for r in vqa if qa(r)[1] in ("yes", "no")]
    assert blind(yes_no, lambda q: q) > 0.8
    assert blind(balanced, lambda q: q) == blind(balanced, question_template) == 0.5


def test_balanced_training_file_keeps_colour_and_shape_and_balances_yes_no(prepared, rows):
    """Stage 2's default training rows: every colour and shape row of the train split, and its
    yes/no rows balanced per template (the question-only baseline learns nothing from them)."""
    mix = json.loads(prepared["vqa-balanced_train"].read_text())
    train = rows["vqa", "train"]
    assert [r["id"] for r in mix] == [r["id"] for r in train if r["id"] in {m["id"] for m in mix}]
    assert {r["id"] for r in train if r["type"] != "yes/no"} <= {r["id"] for r in mix}
    counts = defaultdict(lambda: {"yes": 0, "no": 0})
    for r in mix:
        if r["type"] == "yes/no":
            counts[question_template(r["conversations"][0]["value"])][r["conversations"][1]["value"]] += 1
    assert len(counts) == 16 and all(c["yes"] == c["no"] >= 100 for c in counts.values())


@pytest.mark.parametrize("share", [0.25, 0.1])
def test_fewer_negated_rows_keep_every_template_balanced(prepared, share):
    """--negated-share (data.easyvqa.fewer_negated): negated yes/no rows make `share` of the
    yes/no rows, every template keeps as many "yes" as "no", and the other rows all stay."""
    mix = json.loads(prepared["vqa-balanced_train"].read_text())
    qa = [(r["conversations"][0]["value"].split("\n")[-1], r["conversations"][1]["value"]) for r in mix]
    keep = fewer_negated(qa, share)
    assert keep == sorted(set(keep)) and keep == fewer_negated(qa, share)   # ordered, seeded
    kept = [qa[i] for i in keep]
    assert [x for x in qa if not is_negated(x[0]) or x[1] not in ("yes", "no")] == \
        [x for x in kept if not is_negated(x[0]) or x[1] not in ("yes", "no")]
    yesno = [x for x in kept if x[1] in ("yes", "no")]
    negated = [x for x in yesno if is_negated(x[0])]
    assert abs(len(negated) / len(yesno) - share) < 0.01
    counts = defaultdict(lambda: {"yes": 0, "no": 0})
    for question, answer in negated:
        counts[question_template(question)][answer] += 1
    assert len(counts) == 8 and all(abs(c["yes"] - c["no"]) <= 1 for c in counts.values())
    assert is_negated("is no circle present?") and not is_negated("is there a red shape?")


# ---- held-out renderings (data/renders.py) ------------------------------------------------

@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    return prepare_renders(tmp_path_factory.mktemp("renders"), n_images=40)


def test_renders_ask_easyvqa_questions_with_yes_no_balanced_per_template(renders, rows, tmp_path):
    """Per image a colour, a shape and two yes/no questions, all in easy-vqa's own templates;
    each yes/no template is answered "yes" exactly as often as "no"; the files are the same on
    every run."""
    rendered = json.loads(renders["renders_test"].read_text())
    assert len(rendered) == 160
    assert [r["type"] for r in rendered[:4]] == ["color", "shape", "yes/no", "yes/no"]
    known = {question_template(r["conversations"][0]["value"]) for r in rows["vqa", "test"]}
    counts = defaultdict(lambda: {"yes": 0, "no": 0})
    for r in rendered:
        question, answer = (turn["value"] for turn in r["conversations"])
        assert question_template(question) in known, question
        if r["type"] == "yes/no":
            counts[question_template(question)][answer] += 1
    assert all(c["yes"] == c["no"] > 0 for c in counts.values())
    again = prepare_renders(tmp_path, n_images=40)
    assert again["renders_test"].read_text() == renders["renders_test"].read_text()
    assert (tmp_path / "images" / "7.png").read_bytes() == \
        (renders["image_root"] / "images" / "7.png").read_bytes()


def test_renders_show_what_their_answers_name(renders):
    """Each image's four answers agree (easy-vqa's own reading of questions gives the colour and
    shape the open answers name), the named colour covers part of the image, and the images
    come in more than one size."""
    rendered = json.loads(renders["renders_test"].read_text())
    sizes = set()
    for i in range(0, len(rendered), 4):
        qa = [(k, r["conversations"][0]["value"].removeprefix("<image>\n"),
               r["conversations"][1]["value"]) for k, r in enumerate(rendered[i:i + 4])]
        color, shape = qa[0][2], qa[1][2]
        assert shape_and_color(qa) == (shape, color)
        image = Image.open(renders["image_root"] / rendered[i]["image"])
        sizes.add(image.size)
        pixels = np.asarray(image.convert("RGB")).astype(int)
        near = (np.abs(pixels - COLOR_RGB[color]).max(-1) <= 30).mean()
        assert near > 0.02, (rendered[i]["image"], color, near)
    assert len(sizes) > 1 and {w for w, _ in sizes} <= set(IMAGE_SIZES)


def test_random_views_repeat_per_seed_and_keep_the_image_whole():
    """Training's random views: the same seed gives the same view, another seed another one;
    the size stays, and the corners show a background colour, never black fill."""
    image = load_image(package_root() / "train" / "images" / "1.png")
    view = lambda seed: np.asarray(random_view(image, random.Random(seed)))  # noqa: E731
    assert view(0).shape == np.asarray(image).shape
    assert (view(0) == view(0)).all() and not (view(0) == view(1)).all()
    for seed in range(20):
        corners = view(seed)[[0, 0, -1, -1], [0, -1, 0, -1]]                  # (4, 3)
        assert corners.min() >= 200, (seed, corners)


def test_turned_images_keep_the_shape_whole_on_their_background():
    """turned: a wide bar turned a quarter stands upright, the same size; the corners it
    uncovers take the background colour; the angle comes from the rng (any, by default)."""
    image = Image.new("RGB", (64, 64), (240, 230, 250))
    ImageDraw.Draw(image).rectangle((8, 28, 55, 35), fill=(255, 0, 0))   # centred, 48 x 8

    class Quarter:
        def uniform(self, low, high):
            assert (low, high) == (-180.0, 180.0)
            return 90.0
    pixels = np.asarray(turned(image, Quarter()))
    rows, cols = np.nonzero((pixels == (255, 0, 0)).all(-1))
    assert (np.ptp(rows) + 1, np.ptp(cols) + 1) == (48, 8)
    assert (pixels[[0, 0, -1, -1], [0, -1, 0, -1]] == (240, 230, 250)).all()
    easy = load_image(package_root() / "train" / "images" / "1.png")
    assert (np.asarray(turned(easy, random.Random(0))) != np.asarray(easy)).any()


def test_image_cache_views_are_fresh_and_plain_pixels_cached(tmp_path):
    """ImageCache: without a view the processed pixels of a path are cached; with one, each
    call is a new view, repeated exactly by a view drawing from a generator seeded the same."""
    path = str(package_root() / "train" / "images" / "1.png")
    pixels = ImageCache(ImageProcessor.clip(64))
    plain = pixels([path])
    assert pixels([path]) is not plain and torch.equal(pixels([path]), plain)
    view = lambda seed: partial(random_view, rng=random.Random(seed))  # noqa: E731
    first, again = pixels([path], view(3)), pixels([path], view(3))
    assert torch.equal(first, again) and not torch.equal(first, plain)
    assert not torch.equal(first, pixels([path], view(4)))


FORMATS = ({f"a {c} shape" for c in COLORS} | {f"a {s}" for s in SHAPES}
           | {f"a {c} {s}" for c in COLORS for s in SHAPES})


def test_matching_statements_are_true_or_one_attribute_off():
    """Stage 0's ITM texts: a true statement names only the image's own colour / shape; a false
    one names exactly one wrong attribute; each kind and each truth comes up about equally."""
    rng, counts = random.Random(0), defaultdict(int)
    for _ in range(3000):
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        text, truth = matching_statement(f"a {color} {shape}", rng)
        words = text.split()[1:]
        named = {w for w in words if w in COLORS or w in SHAPES}
        wrong = named - {color, shape}
        assert text in FORMATS, text
        assert len(wrong) == 1 - truth, text
        kind = "color" if words[-1] == "shape" else "shape" if len(words) == 1 else "both"
        counts[kind, truth] += 1
    assert len(counts) == 6 and all(400 < n < 600 for n in counts.values()), dict(counts)


def test_multiple_choice_letter_points_at_answer(rows):
    vqa = {r["id"]: r["conversations"][1]["value"] for r in rows["vqa", "val"]}
    letters = defaultdict(set)
    for row in rows["mc", "val"]:
        options, letter, truth = row["options"], row["conversations"][1]["value"], row["answer_text"]
        assert truth == vqa[row["id"]] and options[LETTERS.index(letter)] == truth
        listed = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
        assert f"\nOptions: {listed}\nAnswer with the option's letter" in row["conversations"][0]["value"]
        expected = {"yes/no": {"yes", "no"}, "shape": set(SHAPES)}.get(row["type"])
        if expected is None:
            assert len(set(options)) == 4 and set(options) <= set(COLORS)
        else:
            assert set(options) == expected and len(options) == len(expected)
        letters[row["type"]].add(letter)
    assert letters == {"yes/no": set("AB"), "shape": set("ABC"), "color": set("ABCD")}
    assert multiple_choice("x-1-q2", "what color is the shape?", "red") == \
        multiple_choice("x-1-q2", "what color is the shape?", "red")


@pytest.mark.parametrize("split", ["val", "test"])
def test_choice_task_needs_the_image(rows, split):
    """Stage 3's task: four options, the two colours x two shapes, so each shares one attribute
    with exactly two others and nothing but the image singles the answer out; the answer is
    the image's complete caption, and it sits at each position about as often."""
    captions = {r["image"]: r["conversations"][1]["value"] for r in rows["captions", split]}
    complete = {i for i, c in captions.items() if len(c.split()) == 3 and "shape" not in c}
    choice = rows["choice", split]
    assert {r["image"] for r in choice} == complete and len(choice) == len(complete)
    positions = defaultdict(int)
    for r in choice:
        options, answer = r["options"], r["conversations"][1]["value"]
        assert answer == captions[r["image"]] and r["type"] == "choice"
        assert len({o.split()[1] for o in options}) == len({o.split()[2] for o in options}) == 2
        assert len(set(options)) == 4
        for o in options:
            shared = [p for p in options if p != o and
                      sum(a == b for a, b in zip(o.split()[1:], p.split()[1:])) == 1]
            assert len(shared) == 2
        listed = ", ".join(options[:-1]) + " or " + options[-1]
        assert r["conversations"][0]["value"] == \
            f"<image>\nWhich of these is in the image: {listed}?\nAnswer with the option's text."
        positions[options.index(answer)] += 1
    assert all(0.15 < positions[i] / len(choice) < 0.35 for i in range(4)), positions
    assert choice_question("x-1-choice", "red", "circle") == choice_question("x-1-choice", "red", "circle")


def test_choice_training_file_replays_as_many_stage2_rows(prepared, rows):
    """Stage 3 trains on the choice task (the default easy-vqa file of stage 3) plus as many
    rows of stage 2's training file, all from training images."""
    assert TRAINING_FILES[3] == "choice"
    train = rows["choice", "train"]
    task = [r for r in train if r["type"] == "choice"]
    stage2 = {r["id"]: r for r in json.loads(prepared["vqa-balanced_train"].read_text())}
    replay = [r for r in train if r["type"] != "choice"]
    assert len(task) == len(replay) > 2000 and train[:len(task)] == task
    assert all(stage2[r["id"]] == r for r in replay) and len({r["id"] for r in replay}) == len(replay)
    train_images = {r["image"] for r in rows["vqa", "train"]}
    assert {r["image"] for r in train} <= train_images


def test_shared_prefix_stops_before_images_differences_and_answers():
    """data.collate.shared_prefix: the leading positions every row has alike, without an image
    or a label there, and not the one that predicts the first answer token."""
    batch = lambda ids, image, labels: {"input_ids": torch.tensor(ids),  # noqa: E731
                                        "image_mask": torch.tensor(image, dtype=torch.bool),
                                        "labels": torch.tensor(labels)}
    no = [-100] * 5
    assert shared_prefix(batch([[1, 2, 3, 4, 5], [1, 2, 9, 4, 5]], [[0] * 5] * 2, [no, no])) == 2
    assert shared_prefix(batch([[1, 2, 3, 4, 5]] * 2, [[0, 0, 1, 0, 0]] * 2, [no, no])) == 2
    answer = [-100, -100, -100, 4, 5]          # position 2 predicts the answer token 3
    assert shared_prefix(batch([[1, 2, 3, 4, 5]] * 2, [[0] * 5] * 2, [answer, no])) == 2
    assert shared_prefix(batch([[1, 2, 3, 4, 5]] * 2, [[0] * 5] * 2, [no, no])) == 4
    assert shared_prefix(batch([[1, 2], [3, 2]], [[0] * 2] * 2, [no[:2], no[:2]])) == 0


# ---- conversation files: validation ------------------------------------------------------

def good(row_id="ok", image="a.png", value="<image>\nWhat is it?"):
    return {"id": row_id, "image": image,
            "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "a cat"}]}


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(folder / "a.png")
    (tmp_path / "outside.png").write_bytes((folder / "a.png").read_bytes())
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    return folder


def write(tmp_path, rows):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


BAD_ROWS = {
    "not an object": ("oops", "not an object"),
    "missing field": ({"id": "bad", "image": "a.png"}, "missing field(s) conversations"),
    "id type": ({**good(), "id": [1]}, "id must be a string or an integer"),
    "image type": ({**good("bad"), "image": 3}, "image must be a non-empty string"),
    "conversations type": ({**good("bad"), "conversations": "hi"}, "conversations must be"),
    "message type": ({**good("bad"), "conversations": turns(("human", "<image>"), ("gpt", 1))},
                     "conversations[1]"),
    "no placeholder": (good("bad", value="What is it?"), "exactly one <image>, found 0"),
    "two placeholders": (good("bad", value="<image><image>\nWhat?"), "exactly one <image>, found 2"),
    "placeholder later": ({**good("bad"), "conversations": turns(
        ("human", "<image>\nA?"), ("gpt", "a"), ("human", "<image> B?"), ("gpt", "b"))},
        "only in the first human turn"),
    "empty answer": ({**good("bad"), "conversations": turns(("human", "<image>\nA?"), ("gpt", " "))},
                     "empty answer"),
    "not alternating": ({**good("bad"), "conversations": turns(
        ("human", "<image>\nA?"), ("human", "B?"))}, "alternate"),
    "ends with human": ({**good("bad"), "conversations": turns(
        ("human", "<image>\nA?"), ("gpt", "a"), ("human", "B?"))}, "alternate"),
    "absolute path": (good("bad", image="/etc/passwd"), "absolute"),
    "dot-dot escape": (good("bad", image="../outside.png"), "escapes the image root"),
    "symlink escape": (good("bad", image="link.png"), "escapes the image root"),
    "missing image": (good("bad", image="nope.png"), "missing"),
    "placeholder without image": ({k: v for k, v in good("bad").items() if k != "image"},
                                  "a row without an image holds <image>"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_named_or_skipped(tmp_path, root, case):
    bad, reason = BAD_ROWS[case]
    path = write(tmp_path, [good(), bad, good("ok2")])
    with pytest.raises(DataError) as err:
        load_conversations(path, root)
    message = str(err.value)
    assert str(path) in message and "row 1" in message and reason in message
    if isinstance(bad, dict) and bad.get("id") == "bad":
        assert "'bad'" in message
    samples, skipped = load_conversations(path, root, on_bad="skip")
    assert [s.id for s in samples] == ["ok", "ok2"]
    assert len(skipped) == 1 and reason in skipped[0]


@pytest.mark.parametrize("content, reason", [
    (b'[{"id": "\xff"}]', "not UTF-8"), (b'[{"id": 1,}]', "invalid JSON"),
    (b'{"id": 1}', "expected a list of rows")])
def test_bad_file_raises_even_with_skip(tmp_path, root, content, reason):
    path = tmp_path / "rows.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=reason):
        load_conversations(path, root, on_bad="skip")


def test_good_rows_parse(tmp_path, root):
    rows = [good(7, value="Describe it.\n<image>"),
            {**good("multi"), "type": "color", "conversations": turns(
                ("human", "<image>\nA?"), ("gpt", " red "), ("human", "B?"), ("gpt", "no"))}]
    samples, skipped = load_conversations(write(tmp_path, rows), root)
    first, multi = samples
    assert skipped == [] and first.id == "7" and not first.image_first
    assert first.turns == [("Describe it.", "a cat")] and first.image == (root / "a.png").resolve()
    assert multi.image_first and multi.turns == [("A?", "red"), ("B?", "no")]
    assert multi.extra == {"type": "color"}
    assert captions(samples) == [(first.image, "a cat"), (multi.image, "red")]
    with pytest.raises(ValueError, match="on_bad"):
        load_conversations(write(tmp_path, rows), root, on_bad="ignore")


def test_text_only_rows_and_one_sample_per_turn(tmp_path, root):
    """A row without "image" (LLaVA-1.5's mix665k has them) is text-only; turn_samples gives a
    multi-turn row one sample per assistant turn, the earlier turns its history."""
    text_only = {"id": "t", "conversations": turns(("human", "Hi?"), ("gpt", "hello"),
                                                   ("human", "Name?"), ("gpt", "Bob"))}
    multi = {**good("m"), "conversations": turns(("human", "<image>\nA?"), ("gpt", "red"),
                                                  ("human", "B?"), ("gpt", "no"))}
    samples, _ = load_conversations(write(tmp_path, [good(), text_only, multi]), root)
    single, text, image = samples
    assert text.image is None and not text.image_first
    assert text.turns == [("Hi?", "hello"), ("Name?", "Bob")]
    split = turn_samples(samples)
    assert split[0] is single
    assert [(s.id, s.image, s.turns, s.extra) for s in split[1:]] == [
        ("t/0", None, [("Hi?", "hello")], {"turn": 0}),
        ("t/1", None, text.turns, {"turn": 1}),
        ("m/0", image.image, [("A?", "red")], {"turn": 0}),
        ("m/1", image.image, image.turns, {"turn": 1})]


# ---- images ------------------------------------------------------------------------------

def rgb_pixels(path):
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_real_easyvqa_image():
    img = load_image(package_root() / "test" / "images" / "0.png")
    assert img.mode == "RGB" and img.size == (64, 64)


def test_broken_files_name_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(1).bytes(500))
    for name in ("truncated.png", "noise.png", "absent.png"):
        with pytest.raises(DataError, match=name):
            load_image(tmp_path / name)


def test_grayscale_and_cmyk(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "gray.png")
    assert (rgb_pixels(tmp_path / "gray.png") == 77).all()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red ink
    r, g, b = rgb_pixels(tmp_path / "cmyk.jpg")[4, 4].astype(int)
    assert r > 230 and g < 30 and b < 30


def test_transparency_composites_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert rgb_pixels(tmp_path / "rgba.png").tolist() == [[[255, 255, 255], [255, 0, 0], [127, 127, 127]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert rgb_pixels(tmp_path / "palette.png").tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_sixteen_bit_is_scaled(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert rgb_pixels(tmp_path / "deep.png")[0].tolist() == [[0] * 3, [128] * 3, [255] * 3]


@pytest.mark.parametrize("limit", [100, 3000])  # 64*64 = 4096 px: over 2x the limit (error), over 1x (warning)
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match="bomb.png.*DecompressionBomb"):
        load_image(tmp_path / "bomb.png")
