"""
What a run shows while it trains and leaves behind: FLOPs counted per token (for MFU), the
progress line and metrics.jsonl record (step, loss, lr, tokens/s, samples/s, MFU, ETA), and
loss curves drawn as PNG with Pillow alone (tools/report.py draws the README's with it too).
"""
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

CURVE_COLORS = ("navy", "firebrick", "darkgreen", "darkorange", "purple", "teal", "gray")


def as_query_heads(query: tuple, kv: tuple) -> tuple:
    """A key / value shape (B, H_kv, S, D) with the query's H heads: grouped-query attention
    computes every query head against its shared key / value head."""
    return (kv[0], query[1], *kv[2:])


def sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, as_query_heads(query, key), as_query_heads(query, value))


def sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, as_query_heads(query, key),
                                    as_query_heads(query, value))


# CUDA's attention kernels, counted with grouped-query attention (fewer key / value heads than
# query heads, as SmolLM2's): torch before 2.13 refuses those shapes in its own formulas.
ATTENTION_FLOPS = {getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_attention{part}"): count
                   for kernel in ("flash", "efficient", "cudnn")
                   for part, count in (("", sdpa_flops), ("_backward", sdpa_backward_flops))}


def count_flops(job, batch: dict, autocast) -> float:
    """Training FLOPs per token, counted (torch's FlopCounterMode: every matmul and attention
    of one forward and backward on a real batch) rather than estimated: frozen weights cost no
    weight gradients, and each component sees its own number of tokens. Model state, gradients
    and the RNG are left as they were."""
    model = job.model
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(), FlopCounterMode(display=False,
                                                  custom_mapping=ATTENTION_FLOPS) as counter:
        with autocast():
            loss = model(batch)
        loss.backward()
    for p in job.trainable():
        p.grad = None
    model.train(was_training)
    return counter.get_total_flops() / batch["tokens"]


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (first compiles and
    recompiles): a count that keeps growing during training means shapes recompile."""
    return dynamo_counters["stats"]["unique_graphs"]


class Progress:
    """Throughput since the run (re)started, the progress line and the metrics record (with
    the graphs compiled since the start, when the step is compiled)."""

    def __init__(self, env, metrics_file: Path, steps: int, start_step: int, flops_per_token):
        self.env, self.metrics_file, self.steps, self.start_step = env, metrics_file, steps, start_step
        self.flops_per_token = flops_per_token
        self.t0, self.tokens, self.samples = time.time(), 0, 0
        self.graphs_before = compiled_graphs()

    def count(self, tokens: int, samples: int):
        """One optimizer step's work, summed over the processes."""
        self.tokens += tokens * self.env.world
        self.samples += samples

    def log(self, step: int, loss: float, lr: float, grad_norm: float):
        dt = time.time() - self.t0
        rec = {"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
               "tokens_per_s": round(self.tokens / dt, 1),
               "samples_per_s": round(self.samples / dt, 2),
               "mfu": round(self.flops_per_token * self.tokens / dt / self.env.peak_flops, 4),
               "elapsed_s": round(dt, 1)}
        compiled = ""
        if self.env.compile:
            rec["compiled_graphs"] = compiled_graphs() - self.graphs_before
            compiled = f" | {rec['compiled_graphs']} graphs compiled"
        eta = dt / (step + 1 - self.start_step) * (self.steps - step - 1)
        self.env.log(f"step {step:5d}/{self.steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                     f"{rec['tokens_per_s']:.0f} tok/s | {rec['samples_per_s']:.1f} samples/s | "
                     f"mfu {100 * rec['mfu']:.1f}% | eta {eta / 60:.1f} min{compiled}")
        self.env.append_jsonl(self.metrics_file, rec)

    def log_validation(self, step: int, result: dict):
        self.env.log(f"validation after step {step + 1}: " + json.dumps(result))
        self.env.append_jsonl(self.metrics_file, {"step": step, "val": result})

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 1)


def plot_losses(metrics_file: Path, png: Path):
    """The training loss curve as a PNG."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    plot_curves({"loss": [(r["step"], r["loss"]) for r in rows if "loss" in r]}, png,
                f"{png.parent}: training loss")


def plot_curves(series: dict, png: Path, title: str, smooth: float = 0.0, log_y: bool = False):
    """Named (step, value) curves on one chart (Pillow only), optionally smoothed by an
    exponential moving average with weight `smooth` on the past, on a log y axis if asked
    (values must then be positive)."""
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
