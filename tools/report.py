"""
The README's results tables, built from run directories, so no number is typed by hand:

    python -m tools.report                  # reads runs/, prints markdown, writes docs/*.png
    python -m tools.report --runs /tmp/runs --docs /tmp/docs

Where each number comes from (a missing file leaves its cells "-"):
  runs/<adapter>/stage2/result.json        trainable parameters, wall time of the run
  runs/<adapter>/stage2/metrics.jsonl      samples/s and tokens/s at the last logged step
  runs/<adapter>/stage2/eval_test.json     open-ended test accuracy, per question type;
                                           text-only perplexity (eval.py --text-ppl)
  runs/<adapter>/stage2/eval_mc_test.json  multiple choice by option likelihood (--kind mc)
  runs/<adapter>/stage2/eval_yesno-balanced_test.json   balanced yes/no (--kind yesno-balanced);
                                           with eval_test.json, the question-only accuracy on
                                           the same rows (eval.py's question_only)
  runs/<adapter>/stage2/eval_choice_test.json  stage 3's choice task before stage 3 (--kind choice)
  runs/<adapter>/stage3/eval_test.json     the choice task after stage 3; eval_vqa_test.json and
                                           eval_yesno-balanced_test.json: stage 2's questions
                                           after stage 3 (--kind vqa, --kind yesno-balanced)
  easy-vqa's own files                     the question-only (blind) baseline row
  runs/stage0, runs/retrieval/<adapter>: eval_retrieval_test.json (R@K, trainable share),
                                           metrics.jsonl (training time of the one epoch)
and docs/loss_stage2.png, docs/loss_stage3.png (the runs' training-loss curves on one chart),
docs/answers_<adapter>_stage2.png (eval.py's grid of test answers).
"""
import argparse
import json
import shutil
from pathlib import Path

from data.dataset import load_conversations
from data.easyvqa import prepare_easyvqa
from eval import question_only
from training.progress import plot_curves
from vlm import ADAPTERS

NAMES = {"crome": "CROME", "iaa": "IAA-8", "mwa": "MWA", "llava": "LLaVA-style (projector only)",
         "full": "full fine-tuning (LLM unfrozen)"}
EASYVQA_BASELINE = 0.876   # the easy-vqa package's CNN + LSTM on its test split (its README)


def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def last_logged(run: Path) -> dict:
    """The last training record of metrics.jsonl (samples/s and tokens/s are run averages)."""
    return next((r for r in reversed(read_lines(run / "metrics.jsonl")) if "loss" in r), {})


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x, fmt="{:,}") -> str:
    return "-" if x is None else fmt.format(x)


def dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def blind_baseline() -> dict:
    """The question-only ("blind") VQA baseline on the whole easy-vqa test split (eval.py's
    question_only, scored as eval.py scores open-ended answers)."""
    files = prepare_easyvqa()
    return question_only(load_conversations(files["vqa_test"], files["image_root"])[0])


def vqa_table(runs: Path) -> str:
    head = ("| model | trainable params (stage 2) | stage-2 wall time | samples/s | tokens/s | "
            "open-ended test acc. (colour / shape / yes-no) | MC by option likelihood, stage 2 | "
            "text-only perplexity (base -> model) |\n|---|---:|---:|---:|---:|---|---:|---|")
    rows = [head]
    for a in ADAPTERS:
        s2 = runs / a / "stage2"
        result, log = read(s2 / "result.json") or {}, last_logged(s2)
        vqa, mc2 = read(s2 / "eval_test.json"), read(s2 / "eval_mc_test.json")
        oe = dig(vqa, "metrics", "open_ended") or {}
        per_type = " / ".join(pct(oe.get(f"accuracy_{t}")) for t in ("color", "shape", "yes/no"))
        ppl = dig(vqa, "metrics", "text_ppl")
        text = "-" if not ppl else f"{ppl['base_llm']:.2f} -> {ppl['text_only']:.2f}"
        trainable = result.get("trainable_params")
        share = "" if not trainable else f" ({100 * trainable / result['total_params']:.1f}%)"
        rows.append(
            f"| {NAMES[a]} | {num(trainable)}{share} | "
            f"{num(result.get('wall_s'), '{:.0f} s')} | {num(log.get('samples_per_s'), '{:.1f}')} | "
            f"{num(log.get('tokens_per_s'), '{:.0f}')} | {pct(oe.get('accuracy'))} ({per_type}) | "
            f"{pct(dig(mc2, 'metrics', 'multiple_choice', 'option_likelihood', 'accuracy'))} | "
            f"{text} |")
    blind = blind_baseline()
    rows.append(f"| question only (blind), the whole test split | 0 | - | - | - | "
                f"{pct(blind['accuracy'])} ({' / '.join(pct(blind[f'accuracy_{t}']) for t in ('color', 'shape', 'yes/no'))}) "
                f"| - | - |")
    sizes = {dig(read(runs / a / "stage2" / "eval_test.json"), "metrics", "n") for a in ADAPTERS}
    rows.append(f"\nTest rows per evaluation: {', '.join(str(n) for n in sorted(sizes - {None}))}; "
                f"the easy-vqa package's CNN+LSTM baseline: {pct(EASYVQA_BASELINE)} open-ended.")
    return "\n".join(rows)


def looking_table(runs: Path) -> str:
    """Per design and baseline with a stage-2 run: does it look at the image? Its open-ended and
    balanced yes/no test accuracy, each beside the question-only baseline on the same rows
    (eval.py's question_only), and its stage-2 validation's balanced yes/no."""
    rows = ["| model | stage-2 wall time | open-ended test (colour / shape / yes-no) | question "
            "only, same rows | balanced yes/no test | question only, same rows | stage-2 "
            "validation: balanced yes/no |\n|---|---:|---|---:|---:|---:|---:|"]
    for a in ADAPTERS:
        s2 = runs / a / "stage2"
        if not (s2 / "result.json").is_file():
            continue
        vqa, balanced = read(s2 / "eval_test.json"), read(s2 / "eval_yesno-balanced_test.json")
        oe = dig(vqa, "metrics", "open_ended") or {}
        per_type = " / ".join(pct(oe.get(f"accuracy_{t}")) for t in ("color", "shape", "yes/no"))
        val = next((r["val"] for r in reversed(read_lines(s2 / "metrics.jsonl")) if "val" in r), {})
        rows.append(f"| {NAMES[a]} | {num(read(s2 / 'result.json').get('wall_s'), '{:.0f} s')} | "
                    f"{pct(oe.get('accuracy'))} ({per_type}) | "
                    f"{pct(dig(vqa, 'metrics', 'question_only', 'accuracy'))} | "
                    f"{pct(dig(balanced, 'metrics', 'open_ended', 'accuracy'))} | "
                    f"{pct(dig(balanced, 'metrics', 'question_only', 'accuracy'))} | "
                    f"{pct(val.get('yesno_balanced_accuracy'))} |")
    return "\n".join(rows)


def stage3_table(runs: Path) -> str:
    """Per model with a stage-3 run: what task fine-tuning gains on its task (the choice task,
    test split) and what it costs on stage 2's test questions, each before -> after."""
    rows = ["| model | stage-3 wall time | choice task test: stage 2 -> stage 3 | open-ended test: "
            "stage 2 -> stage 3 | balanced yes/no test: stage 2 -> stage 3 |\n|---|---:|---|---|---|"]

    def change(before, after) -> str:
        if before is None or after is None:
            return f"{pct(before)} -> {pct(after)}"
        return f"{pct(before)} -> {pct(after)} ({100 * (after - before):+.1f} points)"

    def accuracy(path):
        return dig(read(path), "metrics", "open_ended", "accuracy")
    for a in ADAPTERS:
        s2, s3 = runs / a / "stage2", runs / a / "stage3"
        if not (s3 / "result.json").is_file():
            continue
        rows.append(f"| {NAMES[a]} | {num(read(s3 / 'result.json').get('wall_s'), '{:.0f} s')} | "
                    f"{change(accuracy(s2 / 'eval_choice_test.json'), accuracy(s3 / 'eval_test.json'))} | "
                    f"{change(accuracy(s2 / 'eval_test.json'), accuracy(s3 / 'eval_vqa_test.json'))} | "
                    f"{change(accuracy(s2 / 'eval_yesno-balanced_test.json'), accuracy(s3 / 'eval_yesno-balanced_test.json'))} |")
    return "\n".join(rows)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def retrieval_table(runs: Path) -> str:
    rows = ["| encoder | trainable params | training time per epoch | samples/s | "
            "image->text R@1 / 5 / 10 | text->image R@1 / 5 / 10 |\n|---|---:|---:|---:|---|---|"]
    for name, run in (("zero-shot (stage 0, frozen)", runs / "stage0"),
                      ("MWA", runs / "retrieval" / "mwa"),
                      ("full fine-tuning", runs / "retrieval" / "full")):
        metrics = dig(read(run / "eval_retrieval_test.json"), "metrics") or {}
        trainable = metrics.get("trainable_params")
        share = f" ({100 * metrics['trainable_fraction']:.1f}%)" if trainable else ""
        cells = [" / ".join(pct(dig(metrics, d, f"R@{k}")) for k in (1, 5, 10))
                 for d in ("image_to_text", "text_to_image")]
        log = {} if run.name == "stage0" else last_logged(run)
        rows.append(f"| {name} | {num(trainable)}{share} | {num(log.get('elapsed_s'), '{:.0f} s')} | "
                    f"{num(log.get('samples_per_s'), '{:.1f}')} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def figures(runs: Path, docs: Path):
    """Loss curves per stage, and each stage-2 run's grid of test answers (eval.py's PNG)."""
    for a in ADAPTERS:
        grid = runs / a / "stage2" / "eval_test.png"
        if grid.is_file():
            docs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, docs / f"answers_{a}_stage2.png")
    for stage in (2, 3):
        series = {}
        for a in ADAPTERS:
            metrics = runs / a / f"stage{stage}" / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines()]
                series[a] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        plot_curves(series, docs / f"loss_stage{stage}.png",
                    f"stage {stage} training loss (EMA 0.6), offline default", smooth=0.6,
                    log_y=True)


def gpu_table(path: Path) -> str:
    """The README's GPU table from tools/gpu_check.py's gpu_check.json."""
    result = read(Path(path))
    env = result["environment"]
    stand_ins = result.get("weights") == "stand-ins"
    head = (f"{env['device']}, torch {env['torch']}{' (dry run on CPU)' if result['dry_run'] else ''}"
            f"{'; stand-in weights (random, in the real shapes): accuracies mean nothing' if stand_ins else ''}"
            "\n\n| row | batch | compile + first 2 steps | ms/step | samples/s | tokens/s | MFU "
            "| peak memory |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {NAMES.get(r['adapter'], r['adapter'])} | failed: see gpu_check.json | | | | | | |"
            if "error" in r else
            f"| {NAMES.get(r['adapter'], r['adapter'])} ({r['dtype']}{', compiled' if r['compiled'] else ''}) "
            f"| {r['batch']} | {r['first_two_steps_s']} s | {r['ms_per_step']} | {r['samples_per_s']} "
            f"| {num(r['tokens_per_s'], '{:,.0f}')} | {pct(r['mfu'])} | {num(r['peak_mb'])} MB |"
            for r in result["steps"]]
    job = result["main_job"]
    val = job.get("validation") or {}
    main_job = f"main job: {job['skipped']}" if "skipped" in job else (
        f"`{job['command']}`: {job['wall_s']} s wall (exit {job['exit_code']}), last validation "
        f"{pct(val.get('accuracy'))} (balanced yes/no {pct(val.get('yesno_balanced_accuracy'))})")
    tail = (f"\n\n{main_job}; 2-GPU DDP: "
            f"{result['ddp'].get('skipped') or 'exit ' + str(result['ddp'].get('exit_code'))}")
    return head + "\n" + "\n".join(rows) + tail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs")
    p.add_argument("--docs", default="docs")
    p.add_argument("--gpu", help="print the GPU table of tools/gpu_check.py's gpu_check.json")
    args = p.parse_args(argv)
    if args.gpu:
        print(gpu_table(Path(args.gpu)))
        return
    runs = Path(args.runs)
    print("\n\n".join(table(runs) for table in (looking_table, stage3_table, vqa_table,
                                                 retrieval_table)))
    figures(runs, Path(args.docs))


if __name__ == "__main__":
    main()
