"""
Train any adapter design through any stage, in one compact loop.

    python train.py --stage 2                          # CROME on the offline default (CPU is fine)
    python train.py --stage 1 --adapter iaa            # stages 1 -> 2 -> 3 hand over automatically
    python train.py --stage 2 --resume                 # continue an interrupted run exactly
    python train.py --stage 2 --out-dir runs/smollm2-clip --adapter crome --max-len 2048 \\
        --llm HuggingFaceTB/SmolLM2-360M-Instruct --vision openai/clip-vit-base-patch16 \\
        --pixel-shuffle 2 --qformer google-bert/bert-base-uncased \\
        --data llava_v1_5_mix665k.json --image-root images/   # hub backbones: README, "Hub models"
    torchrun --nproc_per_node=8 train.py --stage 2     # DDP: NCCL on GPUs, gloo on CPU
    torchrun --nproc_per_node=8 train.py --preset iaa14-llama3-8b --stage 2 --shard fsdp \
        --activation-checkpointing                     # FSDP2: sharded weights, grads, AdamW
    python train.py --task retrieval --adapter mwa     # MWA's paper setting (or --adapter full)

Stages: 0 pretrains the offline vision tower in two runs: the tower (--task tower: the ViT
alone learns to name each image's caption, upright first, then turned by any angle), then
BLIP-2's stage 1 on it (the Q-Former's query way: image-text contrast against the frozen MiniLM
text way, and image-text matching), and saves them in the hub's CLIP / BLIP-2 layouts; a run
that needs them trains them first, once; hub users skip them. 1 pretraining
on captions, 2 instruction tuning (VQA), 3 task fine-tuning (easy-vqa: picking the image's
colour-shape pair among four, data/easyvqa.py; your own data: e.g. letter multiple choice).
What trains per stage: vlm.TRAINABLE. --task retrieval is MWA's own setting instead:
image-text retrieval with stage 0's dual encoder (training/stages.py, retrieval_job).

The path of a run: main -> training.config (flags, resolve, prerequisites) -> [the tower and
stage 0 first, when missing] -> training.stages.build_job (data, model, what trains) -> train (the loop below)
-> the run directory: config.json, model.safetensors (the trained weights only),
optimizer.safetensors + trainer_state.json (for --resume), metrics.jsonl, loss.png and
result.json (wall time, trainable and total parameter counts).
"""
import json
import math
import sys
from dataclasses import asdict

import torch

from data.dataset import DataError
from training.checkpointing import resume_from_checkpoint, save_checkpoint, start_fresh
from training.config import (check_prerequisites, missing_runs, parse_args, resolve, run_dir,
                             run_name)
from training.parallel import clip_grad_norm_, distribute
from training.progress import Progress, count_flops, plot_losses
from training.runtime import Env, stop_on_signals
from training.stages import Job, build_job
from weights.checkpoint import CheckpointError, save_json


def main(argv=None) -> dict:
    cfg = resolve(parse_args(argv, description=__doc__))  # every default decided, once
    check_prerequisites(cfg)            # what can fail does so now, before any training
    env = Env(cfg)
    for first in missing_runs(cfg):     # no offline tower yet: the tower, stage 0 (once each)
        env.log(f"{run_name(asdict(first))} is missing: training it first into {run_dir(first)} "
                "(once; hub users pass --vision/--qformer instead)")
        train(first, seeded_job(first, env), env)
    result = train(cfg, seeded_job(cfg, env), env)
    env.log(json.dumps(result))
    env.close()
    return result


def seeded_job(cfg, env) -> Job:
    """build_job right after seeding, so a run starts from the same weights whether or not
    stage 0 trained first in the same process."""
    torch.manual_seed(cfg.seed)
    return build_job(cfg, env)


def train(cfg, job: Job, env) -> dict:
    """The one loop: AdamW (a group per component, decay on >= 2-D tensors), cosine schedule
    with warmup, gradient accumulation, clipping, bf16 autocast, logging, validation, atomic
    checkpoints, exact resume, a clean exit on SIGINT / SIGTERM."""
    out = run_dir(cfg)
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    if len(job.samples) < global_batch:
        raise SystemExit(f"{len(job.samples)} training samples is fewer than one global batch "
                         f"({global_batch}); lower --batch-size or --grad-accum")
    steps = cfg.steps or len(job.samples) // global_batch   # 0 (retrieval): one epoch
    model = distribute(job, cfg, env)   # DDP, FSDP2 and activation checkpointing
    opt = make_optimizer(job.param_groups, cfg.weight_decay, env.device)
    start = resume_from_checkpoint(out, cfg, job, opt, env) if cfg.resume else start_fresh(out, env)
    step_fn = torch.compile(model) if env.compile else model
    log_header(cfg, job, env, steps, global_batch)
    first = job.batch(batch_indices(len(job.samples), cfg.batch_size, 0, cfg.seed, 0, 1))
    progress = Progress(env, out / "metrics.jsonl", steps, start,
                        count_flops(job, first, env.autocast))
    stop = stop_on_signals()
    job.model.train()
    for step in range(start, steps):
        # the learning rate of this step: linear warmup, then cosine decay
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, steps, cfg.warmup)
        # forward and backward over the micro-batches; gradients add up, the loss is their mean
        loss_sum, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            indices = batch_indices(len(job.samples), global_batch, step, cfg.seed,
                                    micro * env.world + env.rank, cfg.grad_accum * env.world)
            batch = job.batch(indices, step)
            with env.autocast():
                loss = step_fn(batch) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
            tokens += batch["tokens"]
        loss_sum = env.mean(loss_sum)   # the same number on every process
        # a non-finite loss: drop its gradients, then stop (keeping the checkpoint) or skip
        skipped = not math.isfinite(loss_sum)
        if skipped:
            opt.zero_grad(set_to_none=True)
            handle_bad_loss(cfg, out, step, loss_sum, env)
        else:
            # clip the gradient norm, update, clear the gradients
            norm = clip_grad_norm_(job.trainable(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            progress.count(tokens, global_batch)
        last = step + 1 == steps
        if not skipped and (step % cfg.log_every == 0 or last):
            progress.log(step, loss_sum, opt.param_groups[0]["lr"], float(norm))
        # validation: at --eval-every and at the end
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            job.model.eval()
            progress.log_validation(step, job.validate())
            job.model.train()
        # checkpoint: at --save-every, at the end, and when a signal asks to stop
        if last or stop.requested or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_checkpoint(out, cfg, job, opt, step + 1, env)
        if stop.requested:
            env.log(f"{stop.requested}: saved a checkpoint at step {step + 1} in {out}; "
                    "continue with --resume")
            sys.exit(130)
    return finish(cfg, job, env, out, steps, progress)


def make_optimizer(groups: dict, weight_decay: float, device) -> torch.optim.AdamW:
    """AdamW, one group pair per component (own lr): decay on >= 2-D tensors only. The fused
    kernel on CPU too: one pass over the weights (stage 2's 34M trainable weights: 24 ms an
    update against about 100 for the default, in a one-off measurement on the 2-core CPU)."""
    param_groups = []
    for name, (params, lr) in groups.items():
        params = [p for p in params if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                param_groups.append({"params": chosen, "lr": lr, "base_lr": lr, "name": name,
                                     "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup, then cosine decay to 10% of the base learning rate."""
    warm = max(1, int(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n: int, global_batch: int, step: int, seed: int, slot: int, n_slots: int):
    """The samples of one micro-batch: global batch `step` of a seeded per-epoch permutation,
    split into n_slots interleaved slices (slot = micro_step * world + rank). A 1-process run
    with accumulation k and a k-process run see the same global batches."""
    per_epoch = n // global_batch
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    chosen = order[offset * global_batch:(offset + 1) * global_batch]
    return chosen[slot::n_slots].tolist()


def log_header(cfg, job: Job, env, steps: int, global_batch: int):
    n_params = sum(p.numel() for p in job.model.parameters())
    n_trainable = sum(p.numel() for p in job.trainable())
    what = {"retrieval": f"retrieval | {cfg.adapter}", "tower": "stage 0 | tower"}.get(
        cfg.task, f"stage {cfg.stage} | {cfg.adapter}")
    env.log(f"{what} | {steps} steps | global batch {global_batch} = "
            f"{cfg.batch_size} per device x {cfg.grad_accum} accumulation x {env.world} processes"
            f"{f' ({cfg.shard})' if env.world > 1 else ''} | "
            f"trainable {n_trainable:,} of {n_params:,} parameters "
            f"({100 * n_trainable / n_params:.2f}%) | "
            f"{env.device} {cfg.dtype}{' compiled' if env.compile else ''}"
            f"{' | activation checkpointing' if cfg.activation_checkpointing else ''}")


def handle_bad_loss(cfg, out, step: int, loss: float, env):
    msg = f"step {step}: loss is {loss}"
    if cfg.nan_policy != "skip":
        kept = f"the last good checkpoint in {out} is kept" \
            if (out / "trainer_state.json").exists() else "no checkpoint was saved yet"
        raise FloatingPointError(f"{msg}; stopped ({kept}). Lower --lr, or pass "
                                 "--nan-policy skip.")
    env.log(msg + "; skipping this step (--nan-policy skip)")


def finish(cfg, job: Job, env, out, steps: int, progress: Progress) -> dict:
    """Stage 0's exports, the loss curve and result.json (wall time of this invocation's
    loop, validation, saving and exports included)."""
    if env.rank == 0 and job.export:
        job.export(out)
    result = {"run_dir": str(out), "steps": steps, "wall_s": progress.elapsed(),
              "trainable_params": sum(p.numel() for p in job.trainable()),
              "total_params": sum(p.numel() for p in job.model.parameters())}
    if env.rank == 0:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        save_json(result, out / "result.json")
    return result


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
