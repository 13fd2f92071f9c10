"""
Where a run executes: the device, the distributed process group, bf16 autocast, the device's
peak FLOP/s (for MFU), and stopping cleanly on SIGINT / SIGTERM. train.py builds one Env from
the resolved config and calls these in one line each.
"""
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from precision import cpu_peak_flops

# Dense bf16 peak FLOP/s of known GPUs (fp32 counts half); others default to an A100's.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                 "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


class Env:
    """Device, distributed rank / world, bf16 autocast and peak FLOP/s for MFU, from a resolved
    TrainConfig. Under torchrun (WORLD_SIZE > 1) it joins the process group: NCCL on GPUs,
    gloo on CPU."""

    def __init__(self, cfg):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world > 1:
            dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        if cfg.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device(cfg.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.compile = cfg.compile == "yes"
        if self.compile:  # the loss reads the answer positions (a data-dependent count) in-graph
            torch._dynamo.config.capture_dynamic_output_shape_ops = True
        self.bf16 = cfg.dtype == "bf16"
        self.peak_flops = peak_flops(self.device, cfg.dtype)

    def autocast(self):
        """bf16 autocast when training in bf16, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def log(self, msg: str):
        if self.rank == 0:
            print(msg, flush=True)

    def mean(self, value: float) -> float:
        """The mean of a number over the processes."""
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

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def peak_flops(device: torch.device, dtype: str) -> float:
    """The device's dense peak: looked up for known GPUs, measured on CPU (cpu_peak_flops)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 312e12)
        return peak if dtype == "bf16" else peak / 2
    return cpu_peak_flops(dtype, torch.get_num_threads())


class StopFlag:
    """Set to the signal's name when SIGINT / SIGTERM asks the run to stop."""
    requested = ""


def stop_on_signals() -> StopFlag:
    """SIGINT / SIGTERM let the current step finish, then the loop saves and exits (a second
    SIGINT kills at once)."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = signal.Signals(signum).name

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return flag
