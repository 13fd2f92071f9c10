"""
A run's checkpoint, written atomically and read back strictly for --resume:

    config.json           {"train": the resolved TrainConfig, plus the job's own entries}
    model.safetensors     the weights the run trains (Job.saved_keys), stamped with the step
    optimizer.safetensors AdamW's state as flat tensors "opt.<group>.<param>.<name>", and the
                          torch RNG state "rng.torch" (no pickle anywhere), stamped too
    trainer_state.json    the step to continue from, written last

The loop calls save_checkpoint / resume_from_checkpoint / start_fresh, one line each.
"""
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from training.config import run_name
from training.parallel import gathered, like
from weights.checkpoint import (CheckpointError, load_strict, read_config, read_safetensors_file,
                                read_safetensors_metadata, save_json, save_safetensors)

CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.safetensors",
                    "trainer_state.json")
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict:
    """AdamW's per-parameter state as flat named tensors."""
    return {f"opt.{i}.{j}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
            for i, group in enumerate(opt.param_groups) for j, p in enumerate(group["params"])
            for k, v in opt.state.get(p, {}).items()}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict, source: str):
    """The inverse of optimizer_tensors, strictly: every moment present and of its
    parameter's shape."""
    params = {f"opt.{i}.{j}": p for i, g in enumerate(opt.param_groups)
              for j, p in enumerate(g["params"])}
    moments = {f"{key}.{k}": p for key, p in params.items() for k in ("exp_avg", "exp_avg_sq")}
    missing = [k for k in moments if k not in tensors]
    misshaped = [k for k in moments if k in tensors and tensors[k].shape != moments[k].shape]
    if missing or misshaped:
        raise CheckpointError(f"{source} does not fit this model's optimizer: missing "
                              f"{missing[:4]}, wrongly shaped {misshaped[:4]}")
    for key, p in params.items():
        state = {k: tensors[f"{key}.{k}"] for k in ADAM_STATE if f"{key}.{k}" in tensors}
        if state:  # the moments placed as their parameter is (sharded under FSDP)
            opt.state[p] = {k: v.to(p.device) if k == "step" else like(v, p)
                            for k, v in state.items()}


def save_checkpoint(out: Path, cfg, job, opt, step: int, env):
    """Everything --resume needs. The files are written into out/.checkpoint first and moved
    into place only when all four exist, trainer_state.json last, so a crash or a full disk
    mid-save leaves the previous checkpoint intact. Both weight files carry the step, so a
    crash between the final renames is caught on resume instead of mixing two steps. Under
    FSDP every process joins in gathering the full tensors; process 0 writes them."""
    state = job.model.state_dict()
    weights = gathered({k: state[k] for k in job.saved_keys}, env.rank)
    optimizer = gathered(optimizer_tensors(opt), env.rank)
    if env.rank != 0:
        return
    staging = out / ".checkpoint"
    shutil.rmtree(staging, ignore_errors=True)
    meta = {"task": cfg.task, "stage": str(cfg.stage), "adapter": cfg.adapter, "step": str(step)}
    save_json({"train": asdict(cfg), **job.config}, staging / "config.json")
    save_safetensors(weights, staging / "model.safetensors", metadata=meta)
    save_safetensors({**optimizer, "rng.torch": torch.get_rng_state()},
                     staging / "optimizer.safetensors", metadata=meta)
    save_json({"step": step, "seed": cfg.seed, "task": cfg.task, "adapter": cfg.adapter,
               "stage": cfg.stage}, staging / "trainer_state.json")
    for name in CHECKPOINT_FILES:
        os.replace(staging / name, out / name)
    staging.rmdir()


def resume_from_checkpoint(out: Path, cfg, job, opt, env) -> int:
    """Load the weights, optimizer state and RNG of out's checkpoint; -> the step to continue
    from. Metrics logged after that checkpoint are dropped: those steps run again."""
    state = read_config(out, "trainer_state.json")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{out / 'trainer_state.json'}: no integer 'step'")
    for name in ("model.safetensors", "optimizer.safetensors"):
        stamped = read_safetensors_metadata(out / name).get("step")
        if stamped is not None and int(stamped) != state["step"]:
            raise CheckpointError(f"{out / name} is from step {stamped}, trainer_state.json from "
                                  f"step {state['step']}: an interrupted save; resume is unsafe")
    saved, wanted = run_name(read_config(out)["train"]), run_name(asdict(cfg))
    if saved != wanted:
        raise CheckpointError(f"--resume: {out} holds {saved}, not {wanted}")
    own = job.model.state_dict()
    weights = {k: like(v, own[k]) if k in own else v
               for k, v in read_safetensors_file(out / "model.safetensors").items()}
    load_strict(job.model, weights, str(out / "model.safetensors"), keys=job.saved_keys)
    tensors = read_safetensors_file(out / "optimizer.safetensors")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{out / 'optimizer.safetensors'}: no 'rng.torch'")
    load_optimizer_tensors(opt, tensors, str(out / "optimizer.safetensors"))
    torch.set_rng_state(tensors["rng.torch"])
    if env.rank == 0:
        keep_metrics_before(out / "metrics.jsonl", state["step"])
    env.log(f"resumed {out} at step {state['step']}")
    return state["step"]


def start_fresh(out: Path, env) -> int:
    """A new run in out: an earlier run's metrics go (its checkpoint is overwritten at the
    first save); -> step 0."""
    if env.rank == 0:
        if (out / "trainer_state.json").exists():
            print(f"note: {out} holds an earlier run; it is overwritten (use --resume to continue)")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    return 0


def keep_metrics_before(metrics_file: Path, step: int):
    if metrics_file.exists():
        lines = [line for line in metrics_file.read_text().splitlines()
                 if json.loads(line)["step"] < step]
        metrics_file.write_text("".join(line + "\n" for line in lines))
