"""eval.py: answer normalisation, letter extraction, scoring per type, R@K with ties, the text
perplexity, letter-likelihood multiple choice (batched == one at a time), and the CLI (one
image; a mixed data file -> JSON/MD/PNG with --text-ppl; the run's own val split) against run
directories trained for 2 steps on tiny hub-layout backbones (tests/tiny.py)."""
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import tiny
import train
from data.dataset import Sample, load_conversations
from data.easyvqa import prepare_easyvqa
from evaluation.answerer import Answerer
from evaluation.scoring import (MC_LETTERS, extract_letter, normalize_answer, option_texts,
                                question_only_answers, question_stem, recall_at_k, score_answers)
from vlm import load_run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in test_train: on a shared 2-core machine torch's default thread pool oversubscribes
    the cores and tiny models run many times slower. eval.main(--num-threads) sets it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("text, want", [
    ("Red", "red"), ("  red  ", "red"), ("red.", "red"), ("The circle", "circle"),
    ("a  Red,   circle!", "red circle"), ("An apple", "apple"), ("yes!", "yes"),
    ("then", "then"), ("", ""),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("(B)", "B"), ("B) red", "B"), ("B. red", "B"), ("(B) red", "B"),
    ("The answer is B.", "B"), ("the Answer is (C)", "C"), ("b", "B"), (" (b) ", "B"),
    ("the answer is a dog", None),
    ("none", None), ("Because", None), ("A red circle", None), ("I think B", None), ("", None),
])
def test_extract_letter(text, want):
    assert extract_letter(text) == want


def test_extract_letter_respects_option_count():
    assert extract_letter("D", n_options=4) == "D"
    assert extract_letter("E", n_options=4) is None


def sample(question, answer, kind=None, **extra):
    return Sample("0", Path("x.png"), [(question, answer)], True,
                  {**({"type": kind} if kind else {}), **extra})


def test_score_answers_per_type():
    samples = [sample("colour?", "red", "color"), sample("colour?", "blue", "color"),
               sample("shape?", "circle", "shape"), sample("any?", "yes", "yes/no")]
    got = score_answers(samples, ["Red.", "green", "a circle", "no"])
    assert got == {"accuracy": 0.5, "n": 4, "accuracy_color": 0.5, "accuracy_shape": 1.0,
                   "accuracy_yes/no": 0.0}
    mc = [sample("q", "B"), sample("q", "A"), sample("q", "C")]
    assert score_answers(mc, ["(B) red", "Because", "C"], multiple_choice=True) == \
        {"accuracy": round(2 / 3, 4), "n": 3}


def test_question_only_answers_by_exact_question_text_else_the_commonest_answer():
    train = [sample("is it red?", "yes"), sample("is it red?", "yes"), sample("is it red?", "no"),
             sample("what colour?", "blue"), sample("what colour?", "blue")]
    asked = [sample("is it red?", "no"), sample("what colour?", "blue"), sample("how many?", "2")]
    assert question_only_answers(train, asked) == ["yes", "blue", "yes"]


def test_question_only_on_easyvqa_is_chance_on_the_balanced_rows():
    """eval.py's question_only metric on the real files: 50% on every balanced yes/no test row,
    and the whole test split's 66.8% that the README quotes."""
    files = prepare_easyvqa()
    rows = lambda kind: load_conversations(files[f"{kind}_test"], files["image_root"])[0]  # noqa: E731
    assert ev.question_only(rows("yesno-balanced"))["accuracy"] == 0.5
    assert ev.question_only(rows("vqa"))["accuracy"] == 0.6683


def test_recall_at_k_counts_ties_pessimistically():
    sim = torch.tensor([[0.9, 0.1, 0.2],     # right one best: rank 1
                        [0.5, 0.5, 0.1],     # tied with another: rank 2
                        [0.3, 0.2, 0.1]])    # right one last: rank 3
    got = recall_at_k(sim, torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    assert got == {"R@1": round(1 / 3, 4), "R@2": round(2 / 3, 4), "R@3": 1.0}
    assert recall_at_k(torch.zeros(4, 4), torch.arange(4), ks=(1, 4)) == {"R@1": 0.0, "R@4": 1.0}


class CharTok:
    def encode(self, text):
        return [ord(c) % 50 for c in text]


def test_text_perplexity_of_uniform_and_perfect_models():
    V = 50
    uniform = ev.text_perplexity(lambda ids: torch.zeros(1, ids.shape[1], V), CharTok())
    assert uniform == pytest.approx(V, rel=1e-6)

    def oracle(ids):  # puts all mass on the true next token
        logits = torch.full((1, ids.shape[1], V), -1e4)
        logits[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 0.0
        return logits
    assert ev.text_perplexity(oracle, CharTok()) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """IAA and CROME stage-2 runs of 2 steps, and the easy-vqa slices."""
    base = tmp_path_factory.mktemp("eval")
    assets = tiny.write_backbones(base)
    data = tiny.easyvqa_slices(base / "data", n=24)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = {"data": data}
    for design in ("iaa", "crome"):
        train.main(["--stage", "2", "--adapter", design, "--llm", str(assets["llm"]),
                    "--vision", str(assets["vision"]), "--qformer", str(assets["qformer"]),
                    "--data", str(data["vqa_train"]), "--val-data", str(data["vqa_val"]),
                    "--image-root", str(data["image_root"]), "--out-dir", str(base / "runs"),
                    "--steps", "2", "--batch-size", "4", "--val-samples", "2", "--dtype", "fp32",
                    "--num-threads", "1"])
        out[design] = base / "runs" / design / "stage2"
    for s, h in handlers.items():
        signal.signal(s, h)
    return out


@pytest.mark.parametrize("design", ["iaa", "crome"])
def test_letter_likelihood_is_a_valid_letter_and_batching_does_not_change_it(runs, design):
    parts = load_run(runs[design], "cpu", bf16=False)
    mc, _ = load_conversations(runs["data"]["mc_test"], runs["data"]["image_root"])
    mc = mc[:6]
    images, questions = [s.image for s in mc], [s.turns[0][0] for s in mc]
    n_options = [len(s.extra["options"]) for s in mc]
    assert len(set(n_options)) > 1 or len({len(q) for q in questions}) > 1  # padding happens
    batched = Answerer(parts, batch_size=4).choose_letters(images, questions, n_options)
    single = Answerer(parts, batch_size=1)
    ids = single.letter_ids(5)
    for letter, image, question, n in zip(batched, images, questions, n_options):
        assert letter in MC_LETTERS[:n]
        logits = single.first_token_logits(single.batch([image], [question]))[0]  # (V,)
        assert letter == MC_LETTERS[int(logits[ids[:n]].argmax())]


@pytest.mark.parametrize("design", ["iaa", "crome"])
def test_option_likelihood_is_the_training_loss_and_batching_does_not_change_it(runs, design):
    parts = load_run(runs[design], "cpu", bf16=False)
    mc, _ = load_conversations(runs["data"]["mc_test"], runs["data"]["image_root"])
    mc = mc[:3]
    images, stems = [s.image for s in mc], [question_stem(s.turns[0][0]) for s in mc]
    options = [option_texts(s) for s in mc]
    flat = [(i, q, o) for i, q, opts in zip(images, stems, options) for o in opts]
    batched = Answerer(parts, batch_size=4).answer_logprobs(*map(list, zip(*flat)))
    single = Answerer(parts, batch_size=1)
    for (image, stem, option), logp in zip(flat, batched):
        batch = single.batch([image], [stem], [option])
        n_answer = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            mean_nll = parts.model(batch).item()          # the training loss on this one row
        assert logp == pytest.approx(-mean_nll * n_answer, rel=1e-4, abs=1e-4)
    start, want = 0, []
    for opts in options:
        row = batched[start:start + len(opts)]
        want.append(MC_LETTERS[row.index(max(row))])
        start += len(opts)
    assert Answerer(parts, batch_size=5).choose_options(images, stems, options) == want


def test_options_and_stem_from_the_question_text():
    q = "Which is a mammal?\nOptions: (A) shark (B) blue whale (C) trout\nAnswer with the option's letter."
    sample = Sample("x", None, [(q, "B")], True, {})
    assert option_texts(sample) == ["shark", "blue whale", "trout"]
    assert question_stem(q) == "Which is a mammal?"
    assert option_texts(Sample("y", None, [(q, "B")], True, {"options": ["p", "q"]})) == ["p", "q"]
    assert option_texts(Sample("z", None, [("What is it?", "B")], True, {})) == []


def test_single_image_cli_prints_the_answer(runs, capsys):
    image = next(Path(runs["data"]["image_root"]).glob("test/images/*.png"))
    argv = ["--checkpoint", str(runs["iaa"]), "--image", str(image),
            "--prompt", "What shape is in the image?", "--max-new-tokens", "4", "--num-threads", "1"]
    got = ev.main(argv)
    printed = capsys.readouterr().out.splitlines()
    assert isinstance(got["answer"], str) and printed[-1] == got["answer"]
    parts = load_run(runs["iaa"], "cpu", bf16=False)
    direct = Answerer(parts, max_len=128, max_new_tokens=4).generate(
        [Image.open(image).convert("RGB")], ["What shape is in the image?"])
    assert direct == [got["answer"]]


def test_mixed_data_file_writes_json_md_png_and_text_ppl(runs, tmp_path):
    data = runs["data"]
    rows = json.loads(data["mc_test"].read_text())[:4] + json.loads(data["vqa_test"].read_text())[:4]
    turns = rows[-1]["conversations"]
    two_turns = dict(rows[-1], id="two", conversations=turns + [
        {"from": "human", "value": "And the colour?"}, turns[1]])
    text_only = {"id": "text", "conversations": [{"from": "human", "value": "Name a colour."},
                                                 {"from": "gpt", "value": "blue"}]}
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(rows + [two_turns, text_only]))
    results = ev.main(["--checkpoint", str(runs["iaa"]), "--data", str(mixed),
                       "--image-root", str(data["image_root"]), "--text-ppl", "--letter-probe",
                       "--batch-size", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "r"),
                       "--num-threads", "1"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(results))
    m = saved["metrics"]
    assert m["n"] == 11 and m["open_ended"]["n"] == 7   # each turn of the two-turn row scored
    assert (m["multi_turn"]["n"], m["multi_turn"]["rows"]) == (2, 1)
    assert {k for k in m["open_ended"] if k.startswith("accuracy_")} == \
        {f"accuracy_{r['type']}" for r in rows[4:]}
    assert {"letter_extraction", "letter_likelihood", "option_likelihood"} == set(m["multiple_choice"])
    records = saved["predictions"]
    mc = [r for r in records if "likelihood_choice" in r]
    assert len(mc) == 4
    hits = sum(r["likelihood_choice"] == r["truth"] for r in mc)
    assert m["multiple_choice"]["letter_likelihood"]["accuracy"] == round(hits / 4, 4)
    open_hits = sum(r["correct"] for r in records if "likelihood_choice" not in r)
    assert m["open_ended"]["accuracy"] == round(open_hits / 7, 4)
    turn_records = [r for r in records if "turn" in r]
    assert [(r["id"], r["turn"]) for r in turn_records] == [("two/0", 0), ("two/1", 1)]
    assert m["multi_turn"]["accuracy"] == round(sum(r["correct"] for r in turn_records) / 2, 4)
    assert records[-1]["image"] is None and records[-1]["truth"] == "blue"
    assert m["letter_probe"]["n"] == 4 and 0 <= m["letter_probe"]["accuracy"] <= 1
    ppl = m["text_ppl"]
    assert ppl["base_llm"] == ppl["text_only"]           # IAA: the text path is the base LLM
    assert math.isfinite(ppl["multimodal_workflow"]) and ppl["multimodal_workflow"] > 1
    md = (tmp_path / "r.md").read_text()
    assert "| multiple_choice / letter_likelihood / accuracy |" in md
    assert "| text_ppl / base_llm |" in md
    with Image.open(tmp_path / "r.png") as png:
        assert png.size == (4 * 224, 3 * 184)
        # under the thumbnails only the prediction lines are coloured (green right, red wrong)
        text = np.asarray(png.convert("RGB").crop((0, 120, 4 * 224, 184))).astype(int)
        assert ((text.max(-1) - text.min(-1)) > 60).any()


def test_each_turn_is_answered_given_the_true_earlier_turns(runs, tmp_path):
    """eval.py answers turn k of a multi-turn row after the row's own turns 0..k-1 (teacher
    forcing), not after its own earlier predictions."""
    data = runs["data"]
    row = json.loads(data["vqa_test"].read_text())[0]
    question, answer = row["conversations"][0]["value"], row["conversations"][1]["value"]
    later = [("What shape is it?", "circle"), ("Is it red?", "yes")]
    row["conversations"] += [{"from": f, "value": v} for q, a in later for f, v in
                             (("human", q), ("gpt", a))]
    path = tmp_path / "turns.json"
    path.write_text(json.dumps([row]))
    results = ev.main(["--checkpoint", str(runs["crome"]), "--data", str(path),
                       "--image-root", str(data["image_root"]), "--max-new-tokens", "3",
                       "--out", str(tmp_path / "t"), "--num-threads", "1"])
    records = results["predictions"]
    assert [r["turn"] for r in records] == [0, 1, 2]
    assert results["metrics"]["multi_turn"]["n"] == 3
    parts = load_run(runs["crome"], "cpu", bf16=False)
    answerer = Answerer(parts, max_len=128, max_new_tokens=3)
    (sample,) = load_conversations(path, data["image_root"])[0]
    truth = [(sample.turns[0][0], answer.strip())] + later
    assert sample.turns == truth and question.replace("<image>", "").strip() == truth[0][0]
    for k, record in enumerate(records):
        want = answerer.generate([sample.image], [truth[k][0]], [truth[:k]])
        assert [record["prediction"]] == want and record["truth"] == truth[k][1]


def test_run_val_split_by_default_and_test_split_needs_data(runs):
    results = ev.main(["--checkpoint", str(runs["crome"]), "--split", "val", "--limit", "3",
                       "--max-new-tokens", "2", "--num-threads", "1"])
    config = json.loads((runs["crome"] / "config.json").read_text())
    assert results["data"] == config["train"]["val_data"]
    assert results["metrics"]["open_ended"]["n"] == 3
    assert "question_only" not in results["metrics"]   # --data: no known training prior
    assert (runs["crome"] / "eval_val.json").is_file() and (runs["crome"] / "eval_val.png").is_file()
    with pytest.raises(SystemExit, match="pass --data"):
        ev.main(["--checkpoint", str(runs["crome"]), "--split", "test"])


def test_kind_picks_the_easyvqa_file_and_names_the_output():
    path, _, name = ev.eval_data({"data": "", "stage": 2}, ev.parse_args(["--checkpoint", "x"]))
    assert (path.name, name) == ("vqa_test.json", "test")
    args = ev.parse_args(["--checkpoint", "x", "--kind", "mc", "--split", "val"])
    path, _, name = ev.eval_data({"data": "", "stage": 2}, args)
    assert (path.name, name) == ("mc_val.json", "mc_val")
    path, _, name = ev.eval_data({"data": "", "stage": 3}, ev.parse_args(["--checkpoint", "x"]))
    assert (path.name, name) == ("choice_test.json", "test")   # stage 3's easy-vqa task
    path, _, name = ev.eval_data({"data": "", "stage": 2}, ev.parse_args(
        ["--checkpoint", "x", "--kind", "choice"]))
    assert (path.name, name) == ("choice_test.json", "choice_test")
    baseline = lambda stage, *flags: ev.is_easyvqa_questions(                 # noqa: E731
        ev.parse_args(["--checkpoint", "x", *flags]), {"data": "", "stage": stage})
    assert baseline(2) and baseline(2, "--kind", "yesno-balanced")
    assert not baseline(3) and not baseline(2, "--kind", "choice")
    with pytest.raises(SystemExit):
        ev.parse_args(["--checkpoint", "x", "--kind", "ocr"])
