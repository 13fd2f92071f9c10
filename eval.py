"""
Evaluation: answer accuracy on a run's test split, one question about your own image, the
frozen LLM's text-only perplexity, and image-text retrieval for stage-0 / retrieval runs.

    python eval.py --checkpoint runs/crome/stage2                 # easy-vqa test split
    python eval.py --checkpoint runs/iaa/stage3 --text-ppl        # + text-only perplexity
    python eval.py --checkpoint runs/crome/stage2 --kind mc       # easy-vqa's multiple choice
    python eval.py --checkpoint runs/crome/stage2 --kind choice   # stage 3's task, before stage 3
    python eval.py --checkpoint runs/crome/stage2 --kind yesno-balanced   # yes/no, 50% blind
    python eval.py --checkpoint runs/crome/stage2 --kind renders  # shapes drawn unlike easy-vqa's
    python eval.py --checkpoint runs/crome/stage2 --data my.json --image-root images/
    python eval.py --checkpoint runs/crome/stage2 --image photo.png --prompt "What shape is this?"
    python eval.py --checkpoint runs/retrieval/mwa                # R@1/5/10 (also runs/stage0)

Which rows get which metric:
  multiple choice   rows whose answer is one letter A-E (easy-vqa's mc files, ScienceQA-style
                    data). Two accuracies: (1) letter extraction from the greedy answer
                    (extract_letter), (2) letter likelihood: one prefill of the prompt, the
                    logits of the first answer token restricted to the option letters
                    ("A".."D" for four options), the highest one chosen. (2) is what
                    lm-eval-style multiple choice does with single-token choices; it never
                    fails to parse, so it separates "knows the answer" from "answers in the
                    format". (3) option likelihood: each option's text scored as the answer
                    to the bare question (the option list and format line removed), summed
                    log-probability of its tokens and the end-of-turn token; the best one's
                    letter chosen. (3) asks the model in the form it was instruction-tuned in,
                    so it also scores a stage-2 model on multiple-choice data. Options come
                    from the row's "options" field, else are parsed from "(A) x (B) y" in the
                    question; the option count for (2) is theirs, else 5.
  captions          every other row of a stage-1 run: exact match after normalize_answer.
  open-ended        every other row: normalised exact match (the VQA convention, simplified),
                    overall and per question type (the row's "type" field when present). On
                    easy-vqa's questions, also "question_only": the blind baseline on the same
                    rows (each question answered as its text most often is in training), so an
                    accuracy always stands next to what the language prior alone gets there.
                    Stage 3's choice rows (--kind choice) too: not looking scores 25% there.
Multi-turn rows: each assistant turn is one question, answered given the row's earlier turns as
they are (teacher-forced history, data.dataset.turn_samples) and scored like any other row; the
turns of multi-turn rows are also scored together under "multi_turn". Text-only rows (no image)
are answered by the LLM path alone. Generation is greedy and batched with the KV cache
(VLM.generate, through evaluation.answerer.Answerer). Outputs, next to the run by
default: eval_<split>.json (metrics and every prediction), eval_<split>.md (the metrics table),
eval_<split>.png (16 examples, green = right, red = wrong).

--letter-probe: the base LLM alone, text only, told each multiple-choice answer in words:
does it pick that answer's letter (see letter_probe)?
--text-ppl: perplexity on TEXT_CORPUS (fixed English sentences written for this file) through
(a) the base LLM loaded fresh from the run's backbone and (b) the trained model's text-only
path (model.llm: for IAA the untouched frozen LLM, so (a) == (b) is the design's promise; for
MWA the LLM with the text-way adapters). For IAA also (c) the multimodal workflow on text.

Retrieval (a stage-0 run dir: its dual encoder as is, the frozen zero-shot baseline; or a
`train.py --task retrieval` run dir): easy-vqa's complete captions of the split
(data.easyvqa.complete_captions), R@1/5/10 both ways (evaluate_retrieval), and the fraction of
the encoder's parameters the run trained (0 for a stage-0 run: no retrieval training). Outputs:
eval_retrieval_<split>.{json,md,png}, the PNG with each image's top-1 caption.
"""
import argparse
import json
import math
import random
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from data.collate import ImageCache
from data.dataset import load_conversations, load_image, turn_samples
from data.easyvqa import complete_captions, prepare_easyvqa, training_kind
from data.renders import prepare_renders
from dual_encoder import CAPTION_TOKENS, load_retrieval_run
from evaluation.answerer import Answerer
from evaluation.scoring import (MC_LETTERS, extract_letter, is_multiple_choice, normalize_answer,
                                option_texts, question_only_answers, question_stem, recall_at_k,
                                score_answers)
from model import LLM
from precision import default_dtype
from text.tokenizer import load_tokenizer
from vlm import load_run
from weights.checkpoint import read_config, save_json

GRID_SIZE = 16

TEXT_CORPUS = (
    "The river runs slowly through the valley before it reaches the sea.",
    "She opened the window to let the cool morning air into the kitchen.",
    "Most trains leave the central station on time, even in winter.",
    "He spent the afternoon reading a long book about the history of ships.",
    "The children built a small house of sticks at the edge of the forest.",
    "Fresh bread tastes best when it is still warm from the oven.",
    "A good map shows the roads, the rivers and the height of the hills.",
    "The meeting was moved to Thursday because the manager was ill.",
    "Bees visit thousands of flowers to make a single jar of honey.",
    "When the sun went down, the temperature dropped very quickly.",
    "The library is open every day except Sunday and public holidays.",
    "Water boils at a lower temperature high up in the mountains.",
    "They planted tomatoes, beans and potatoes in the garden last spring.",
    "The old bridge was closed for repairs after the heavy storm.",
    "Learning a new language takes patience and a lot of practice.",
    "The cat slept on the warm stones next to the fireplace all evening.",
    "Our teacher asked us to write a short story about a summer holiday.",
    "The price of coffee has risen sharply over the past two years.",
    "Doctors recommend drinking enough water and sleeping at least seven hours.",
    "The museum keeps paintings from many different countries and centuries.",
    "A strong wind blew the leaves across the empty parking lot.",
    "He fixed the broken chair with a few nails and some glue.",
    "The moon moves around the Earth about once every twenty-seven days.",
    "Please turn off the lights when you leave the room.",
    "The village has one shop, one school and a small church.",
    "She plays the piano for an hour every evening after dinner.",
    "Heavy rain caused the football match to be cancelled.",
    "The scientists measured the depth of the lake with a long rope.",
    "Many birds fly south in autumn to find food and warmer weather.",
    "After a long walk, they sat down to rest under a large oak tree.",
)


@torch.no_grad()
def evaluate_retrieval(model, wordpiece, pixels, samples, batch_size=64) -> tuple[dict, list[dict]]:
    """R@1/5/10 of a DualEncoder (eval mode) on captioned images, one caption per sample:
    image -> text ranks the split's distinct captions for each image (its own caption right);
    text -> image ranks every image for each distinct caption (all images with that caption
    right: easy-vqa repeats captions). Similarity: the DualEncoder's (best query per pair).
    Returns the metrics and one record per image with its top-1 caption."""
    t0 = time.time()
    device = model.logit_scale.device
    captions = sorted({s.turns[0][1] for s in samples})
    ids, mask = wordpiece(captions, max_length=CAPTION_TOKENS)
    text = model.text_features(model.text_pooled(ids.to(device), mask.to(device)))   # (C, E)
    queries = torch.cat([model.image_features(pixels([s.image for s in samples[i:i + batch_size]])
                                              .to(device))[0]
                         for i in range(0, len(samples), batch_size)])                # (N, Q, E)
    sim = model.similarity(queries, text)                                              # (N, C)
    truth = torch.tensor([captions.index(s.turns[0][1]) for s in samples], device=device)
    same = truth[None, :] == torch.arange(len(captions), device=device)[:, None]       # (C, N)
    dt = time.time() - t0
    metrics = {"image_to_text": recall_at_k(sim, truth), "text_to_image": recall_at_k(sim.t(), same),
               "n_images": len(samples), "n_captions": len(captions), "seconds": round(dt, 1)}
    top = sim.argmax(1).tolist()
    records = [{"id": s.id, "image": str(s.image), "question": "image -> caption",
                "truth": s.turns[0][1], "prediction": captions[j], "correct": captions[j] == s.turns[0][1]}
               for s, j in zip(samples, top)]
    return metrics, records


# ----------------------------------------------------------------------------- evaluation


def evaluate(answerer, samples, stage: int) -> tuple[dict, list[dict]]:
    """Metrics (see the module docstring) and one record per question: per sample, its last
    turn given the earlier ones (data.dataset.turn_samples makes one sample per turn)."""
    t0 = time.time()
    images, questions = [s.image for s in samples], [s.turns[-1][0] for s in samples]
    histories = [s.turns[:-1] for s in samples]
    predictions = answerer.generate(images, questions, histories)
    mc = [i for i, s in enumerate(samples) if is_multiple_choice(s)]
    other = sorted(set(range(len(samples))) - set(mc))
    chosen, by_text = {}, {}
    if mc:
        options = {i: option_texts(samples[i]) for i in mc}
        n_options = [len(options[i]) or len(MC_LETTERS) for i in mc]
        chosen = dict(zip(mc, answerer.choose_letters(
            [images[i] for i in mc], [questions[i] for i in mc], n_options,
            [histories[i] for i in mc])))
        listed = [i for i in mc if options[i]]
        by_text = dict(zip(listed, answerer.choose_options(
            [images[i] for i in listed], [question_stem(questions[i]) for i in listed],
            [options[i] for i in listed], [histories[i] for i in listed])))
    metrics = {}
    if other:
        metrics["caption" if stage == 1 else "open_ended"] = score_answers(
            [samples[i] for i in other], [predictions[i] for i in other])
    if mc:
        mc_samples = [samples[i] for i in mc]
        metrics["multiple_choice"] = {
            "letter_extraction": score_answers(mc_samples, [predictions[i] for i in mc], True),
            "letter_likelihood": score_answers(mc_samples, [chosen[i] for i in mc], True)}
        if by_text:
            metrics["multiple_choice"]["option_likelihood"] = score_answers(
                [samples[i] for i in by_text], list(by_text.values()), True)
    turns = [i for i, s in enumerate(samples) if "turn" in s.extra]
    if turns:
        metrics["multi_turn"] = score_answers([samples[i] for i in turns],
                                              [predictions[i] for i in turns]) | {
            "rows": len({samples[i].id.rsplit("/", 1)[0] for i in turns})}
    dt = time.time() - t0
    metrics["n"], metrics["seconds"] = len(samples), round(dt, 1)
    metrics["samples_per_s"] = round(len(samples) / max(dt, 1e-9), 2)
    records = []
    for i, (s, pred) in enumerate(zip(samples, predictions)):
        truth = s.turns[-1][1]
        correct = extract_letter(pred) == truth.strip() if i in chosen else \
            normalize_answer(pred) == normalize_answer(truth)
        records.append({"id": s.id, "image": None if s.image is None else str(s.image),
                        "question": questions[i], "truth": truth, "prediction": pred,
                        "correct": correct,
                        **({"likelihood_choice": chosen[i]} if i in chosen else {}),
                        **({"option_choice": by_text[i]} if i in by_text else {}),
                        **{k: s.extra[k] for k in ("type", "answer_text", "turn") if k in s.extra}})
    return metrics, records


@torch.no_grad()
def text_perplexity(forward, tok, texts=TEXT_CORPUS, device="cpu") -> float:
    """exp(mean next-token NLL) over texts, each encoded on its own as plain text (no chat
    markup, no BOS); forward(ids (1, T)) -> logits (1, T, V)."""
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok.encode(text)], device=device)   # (1, T)
        logits = forward(ids).float()                            # (1, T, V)
        nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def text_ppl_report(parts, llm_source: str, bf16: bool) -> dict:
    """Perplexity through the base LLM (loaded fresh) and the trained model's text paths."""
    model, device = parts.model, next(parts.model.parameters()).device
    base = LLM.from_pretrained(llm_source, dtype=torch.bfloat16 if bf16 else None, device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def ppl(fn):
        with ctx():
            return round(text_perplexity(fn, parts.tok, device=device), 4)

    report = {"corpus_sentences": len(TEXT_CORPUS), "base_llm": ppl(lambda ids: base(idx=ids)),
              "text_only": ppl(lambda ids: model.llm(idx=ids))}
    if model.cfg.adapter == "iaa":
        report["multimodal_workflow"] = ppl(lambda ids: model.run_llm(idx=ids))
    return report


@torch.no_grad()
def letter_probe(llm_source: str, samples, system_prompt: str = "") -> dict:
    """Text only, through the base LLM: each multiple-choice row's question preceded by its
    answer in words ("The answer is red."), answered by letter likelihood. It measures whether
    the frozen LLM can turn a known answer into its option letter, which every frozen-LLM
    design relies on in stage 3: the visual tokens can say "red", the letter is the LLM's."""
    llm, tok = LLM.from_pretrained(llm_source).eval(), load_tokenizer(llm_source)
    letters = [tok.encode(c)[0] for c in MC_LETTERS]
    choices = []
    for s in samples:
        options, (question, truth) = option_texts(s), s.turns[-1]
        told = f"The answer is {options[MC_LETTERS.index(truth.strip())]}.\n{question}"
        prompt = tok.render_chat([{"role": "system", "content": system_prompt},
                                  {"role": "user", "content": told}], add_generation_prompt=True)
        logits = llm(idx=torch.tensor([tok.encode(prompt, allow_special=True)]))[0, -1]  # (V,)
        choices.append(MC_LETTERS[int(logits[letters[:len(options)]].argmax())])
    return score_answers(samples, choices, multiple_choice=True)


# ----------------------------------------------------------------------------- outputs


def metrics_table(results: dict) -> str:
    """The metrics as a markdown table, one row per number."""
    rows = []

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix} / {k}" if prefix else k, v)
        elif isinstance(value, (int, float)):
            rows.append(f"| {prefix} | {value} |")

    walk("", results["metrics"])
    head = f"# eval: {results['checkpoint']} on {results['data']}\n\n| metric | value |\n|---|---|\n"
    return head + "\n".join(rows) + "\n"


def draw_grid(records, path, size=GRID_SIZE, cell=(224, 184), thumb=112):
    """A PNG of the first `size` records: image, question, prediction (green: right), truth."""
    cols = 4
    rows = max(1, math.ceil(min(size, len(records)) / cols))
    sheet = Image.new("RGB", (cols * cell[0], rows * cell[1]), "white")
    draw = ImageDraw.Draw(sheet)
    for i, rec in enumerate(records[:size]):
        x, y = (i % cols) * cell[0], (i // cols) * cell[1]
        if rec["image"] is not None:   # a text-only row leaves its thumbnail blank
            sheet.paste(load_image(rec["image"]).resize((thumb, thumb)), (x + 4, y + 4))
        lines = textwrap.wrap(rec["question"].split("\n")[0], 36)[:3]
        ty = y + thumb + 8
        for line in lines:
            draw.text((x + 4, ty), line, fill="black")
            ty += 12
        color = (0, 140, 0) if rec["correct"] else (200, 0, 0)
        draw.text((x + 4, ty), f"pred: {rec['prediction'][:30]}", fill=color)
        truth = rec["truth"] + (f" ({rec['answer_text']})" if "answer_text" in rec else "")
        draw.text((x + 4, ty + 12), f"truth: {truth[:30]}", fill="black")
    sheet.save(path)


def write_outputs(results: dict, prefix: Path) -> list[Path]:
    paths = [prefix.with_name(prefix.name + ext) for ext in (".json", ".md", ".png")]
    save_json(results, paths[0])
    paths[1].write_text(metrics_table(results))
    draw_grid(results["predictions"], paths[2])
    return paths


# ----------------------------------------------------------------------------- CLI


def eval_data(saved_train: dict, args) -> tuple[Path, Path, str]:
    """(json file, image root, name) to evaluate: --data, else the run's data for --split
    (easy-vqa's file for the run's stage when it trained on the defaults)."""
    if args.data:
        if not args.image_root:
            raise SystemExit("--data needs --image-root (the folder its image paths are relative to)")
        return Path(args.data), Path(args.image_root), Path(args.data).stem
    if saved_train["data"]:
        if args.split == "test" or not saved_train["val_data"]:
            raise SystemExit(f"this run trained on {saved_train['data']}, which has no known "
                             f"{args.split} file: pass --data FILE --image-root DIR")
        return Path(saved_train["val_data"]), Path(saved_train["image_root"]), args.split
    default = training_kind(saved_train)
    kind = args.kind or default
    if kind == "renders" and args.split != "test":
        raise SystemExit("--kind renders has a test split only")
    files = prepare_renders() if kind == "renders" else prepare_easyvqa()
    name = args.split if kind == default else f"{kind}_{args.split}"
    return files[f"{kind}_{args.split}"], files["image_root"], name


def is_easyvqa_questions(args, saved_train: dict) -> bool:
    """Questions in easy-vqa's templates (vqa, yesno-balanced, renders): question-only applies."""
    kind = args.kind or training_kind(saved_train)
    return not args.data and not saved_train["data"] and kind in ("vqa", "yesno-balanced", "renders")


def question_only(questions) -> dict:
    """The question-only baseline on the same easy-vqa rows: each question answered as its
    text is most often answered in the training split (the whole split, as the package gives
    it), without the image."""
    files = prepare_easyvqa()
    train = load_conversations(files["vqa_train"], files["image_root"])[0]
    return score_answers(questions, question_only_answers(train, questions))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a stage 1-3 run directory, or a stage-0 / retrieval one for retrieval")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--kind", choices=["captions", "vqa", "mc", "choice", "yesno-balanced", "renders"],
                   help="which easy-vqa file (default: the one the run's stage trained on); "
                        "e.g. --kind mc: a stage-2 model on multiple choice; yesno-balanced: "
                        "yes/no balanced per template (question-only 50%%); renders: shapes "
                        "drawn unlike easy-vqa's (data/renders.py, test only)")
    p.add_argument("--data", help="a LLaVA-format JSON to evaluate instead of the run's split")
    p.add_argument("--image-root", help="the folder --data's image paths are relative to")
    p.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp32"],
                   help="default: the run's training dtype where bf16 is fast (GPUs, CPUs "
                        "with AVX512-BF16 or AMX: precision.default_dtype), else fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output prefix (default RUN_DIR/eval_<split>)")
    p.add_argument("--text-ppl", action="store_true", help="also the text-only perplexity")
    p.add_argument("--letter-probe", action="store_true",
                   help="also: can the base LLM, told the answer in words, pick its letter?")
    p.add_argument("--image", help="answer --prompt about this one image and exit")
    p.add_argument("--prompt", help="the question for --image")
    p.add_argument("--num-threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if bool(args.image) != bool(args.prompt):
        p.error("--image and --prompt go together")
    if args.limit < 0 or args.batch_size < 1:
        p.error("--limit must be >= 0 and --batch-size >= 1")
    return args


def subset(rows, limit):
    """A fixed random `limit` rows, in their order (all when limit is 0 or covers them)."""
    if not limit or limit >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), limit))]


def retrieval_main(args, run, saved, device) -> dict:
    """Retrieval metrics of a stage-0 or retrieval run on its captions split, written to disk."""
    if args.image or args.text_ppl or args.kind not in (None, "captions"):
        raise SystemExit("--image/--prompt, --text-ppl and --kind vqa/mc/choice are for stage 1-3 runs")
    model, processor, wordpiece = load_retrieval_run(run, device)
    data, root, name = eval_data(saved["train"], args)
    samples = subset(complete_captions(load_conversations(data, root)[0]), args.limit)
    print(f"evaluating {run} on {data}: retrieval over {len(samples)} images", flush=True)
    metrics, records = evaluate_retrieval(model, wordpiece, ImageCache(processor), samples,
                                          args.batch_size)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics |= {"trainable_params": trained, "total_params": total,
                "trainable_fraction": round(trained / total, 6)}
    results = {"checkpoint": str(run), "data": str(data), "dtype": "fp32", "limit": args.limit,
               "metrics": metrics, "predictions": records}
    paths = write_outputs(results, Path(args.out) if args.out else run / f"eval_retrieval_{name}")
    print(json.dumps(metrics, indent=1))
    print("wrote " + ", ".join(map(str, paths)))
    return results


def main(argv=None) -> dict:
    """Returns {"answer": str} for --image, else the results written to disk."""
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    run = Path(args.checkpoint)
    saved = read_config(run)
    if saved["train"].get("task", "vqa") == "retrieval" or saved["train"]["stage"] == 0:
        return retrieval_main(args, run, saved, device)
    bf16 = args.dtype == "bf16" if args.dtype else \
        saved["train"]["dtype"] == "bf16" and default_dtype(device) == "bf16"  # measured if bf16
    parts = load_run(run, device, bf16)
    answerer = Answerer(parts, bf16, args.batch_size, saved["train"]["max_len"], args.max_new_tokens)
    if args.image:
        answer = answerer.generate([load_image(args.image)], [args.prompt])[0]
        print(answer)
        return {"answer": answer}
    data, root, name = eval_data(saved["train"], args)
    rows = subset(load_conversations(data, root)[0], args.limit)
    questions = turn_samples(rows)
    print(f"evaluating {run} on {data}: {len(rows)} rows, {len(questions)} questions", flush=True)
    metrics, records = evaluate(answerer, questions, saved["train"]["stage"])
    if "open_ended" in metrics and is_easyvqa_questions(args, saved["train"]):
        metrics["question_only"] = question_only(questions)
    if args.text_ppl:
        metrics["text_ppl"] = text_ppl_report(parts, saved["backbones"]["llm"], bf16)
    probed = [s for s in questions if is_multiple_choice(s) and option_texts(s)]
    if args.letter_probe and probed:
        metrics["letter_probe"] = letter_probe(saved["backbones"]["llm"], probed,
                                               parts.model.cfg.system_prompt)
    results = {"checkpoint": str(run), "data": str(data), "dtype": "bf16" if bf16 else "fp32",
               "limit": args.limit, "metrics": metrics, "predictions": records}
    prefix = Path(args.out) if args.out else run / f"eval_{name}"
    paths = write_outputs(results, prefix)
    print(json.dumps(metrics, indent=1))
    print("wrote " + ", ".join(map(str, paths)))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
