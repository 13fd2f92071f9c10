"""
Side-by-side speed of our components vs the reference implementation (transformers), on the
same weights, in the same process, same dtype and thread count. A benchmark, not a test.

    python -m tools.bench                # every row, fp32 and bf16
    python -m tools.bench --only llm --dtypes bf16

Rows (each: ours ms, reference ms, ratio = reference / ours, so > 1 means we are faster):
  llm forward         SmolLM2-135M (offline), B x T tokens, full logits
  llm fwd+bwd frozen  weights frozen, gradients flow to inputs_embeds (what adapter training
                      does), logits only for the last 8 positions in both implementations
  llm decode          greedy KV-cache generation, new tokens per second (ratio = ours / ref)
  llm fwd+bwd compiled  (--compiled) the frozen step with ours and the reference each under
                      torch.compile (inductor), timed after compiling; compile times printed
  vit forward         a CLIP ViT-B/16-shaped tower (random weights), 224 px
  qformer forward     a BLIP-2 Q-Former (BERT-base shape, 32 queries) on ViT-B features

    python -m tools.bench --only step    # one training step per adapter (ours only, no reference)

Training-step rows: each design and baseline at stage 2 on the offline default (SmolLM2, the
offline towers with fresh weights: speed does not depend on their values, real easy-VQA
batches), in its own process so peak memory is its own: ms per optimizer step, samples/s,
tokens/s, peak memory (CUDA: max allocated; CPU: the process's peak RSS, weights included)
and MFU against training.runtime.peak_flops, with FLOPs counted as train.py counts them.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers

from model import LLM
from qformer import QFormer
from tools.gpu_check import measure_step
from vit import ViT
from vlm import ADAPTERS
from weights.offline import smollm2_folder


def timed(fn, repeat=5, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name, dtype, ours, ref, unit="ms", higher_is_better=False):
    ratio = ours / ref if higher_is_better else ref / ours
    scale = 1 if higher_is_better else 1000
    print(f"| {name:<22} | {dtype:<5} | {ours * scale:10.1f} | {ref * scale:10.1f} | {unit:<5} | "
          f"{ratio:5.2f}x |", flush=True)


def bench_llm(dtype, batch, seq, compiled=False):
    folder = smollm2_folder()
    ours = LLM.from_pretrained(folder, dtype=dtype)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ref.requires_grad_(False)
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    idx = torch.randint(0, ours.config.vocab_size, (batch, seq))
    with torch.no_grad():
        report(f"llm forward {batch}x{seq}", name, timed(lambda: ours(idx)),
               timed(lambda: ref(idx).logits))

    last = torch.zeros(batch, seq, dtype=torch.bool)
    last[:, -8:] = True

    def ours_step(model=ours):
        x = ours.embed(idx).detach().requires_grad_(True)
        model(inputs_embeds=x, logits_at=last).float().logsumexp(-1).mean().backward()

    def ref_step(model=ref):
        x = ref.model.embed_tokens(idx).detach().requires_grad_(True)
        model(inputs_embeds=x, logits_to_keep=8).logits.float().logsumexp(-1).mean().backward()

    report(f"llm fwd+bwd frozen {batch}x{seq}", name, timed(ours_step, 3, 1), timed(ref_step, 3, 1))
    if compiled:  # both models compiled (inductor), each timed after its compile
        ours_c, ref_c = torch.compile(ours), torch.compile(ref)
        ours_compiled_step, ref_compiled_step = lambda: ours_step(ours_c), lambda: ref_step(ref_c)
        compile_s = [timed(step, 1, 0) for step in (ours_compiled_step, ref_compiled_step)]
        print(f"compile + first step: ours {compile_s[0]:.0f} s, reference {compile_s[1]:.0f} s",
              flush=True)
        report(f"llm fwd+bwd compiled {batch}x{seq}", name, timed(ours_compiled_step, 3, 1),
               timed(ref_compiled_step, 3, 1))

    prompt, new = idx[:1, :32], 64
    ours_s = timed(lambda: ours.generate(prompt, max_new_tokens=new), 3, 1)
    ref_s = timed(lambda: ref.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0), 3, 1)
    report("llm decode (tok/s)", name, new / ours_s, new / ref_s, "tok/s", higher_is_better=True)


def bench_vit(dtype, batch):
    cfg = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, image_size=224, patch_size=16)
    ref = transformers.CLIPVisionModel(cfg).eval().to(dtype)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = ViT.from_pretrained(d, dtype=dtype).eval()
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    x = torch.randn(batch, 3, 224, 224, dtype=dtype)
    with torch.no_grad():
        report(f"vit forward B={batch}", name, timed(lambda: ours(x, select_layer=-1)),
               timed(lambda: ref(pixel_values=x).last_hidden_state))


def bench_qformer(dtype, batch):
    qcfg = transformers.Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                           intermediate_size=3072, encoder_hidden_size=768)
    # Blip2Config sets the Q-Former's encoder width to the vision tower's: make that 768 too
    cfg = transformers.Blip2Config(vision_config=dict(hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=12, image_size=32, patch_size=16),
                                   qformer_config=qcfg.to_dict(),
                                   text_config=dict(model_type="opt", vocab_size=64, hidden_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                                    word_embed_proj_dim=32), num_query_tokens=32)
    full = transformers.Blip2Model(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        full.save_pretrained(d)
        ours = QFormer.from_pretrained(d).to(dtype).eval()
    ref = full.qformer.to(dtype)
    queries = full.query_tokens.to(dtype)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    feats = torch.randn(batch, 197, 768, dtype=dtype)
    with torch.no_grad():
        report(f"qformer forward B={batch}", name, timed(lambda: ours(feats), 3, 1),
               timed(lambda: ref(query_embeds=queries.expand(batch, -1, -1),
                                 encoder_hidden_states=feats).last_hidden_state, 3, 1))


def bench_step(adapter, dtype, batch_size, folder):
    """One row: the training step of train.py for `adapter`, eager."""
    r = measure_step(adapter, dtype, batch_size, folder)
    print(f"| train step {adapter:<6} | {dtype:<5} | {r['ms_per_step']:8.0f} | {r['samples_per_s']:9.1f} | "
          f"{r['tokens_per_s']:8.0f} | {r['peak_mb']:8.0f} | {100 * r['mfu']:5.1f}% |", flush=True)


def step_rows(dtypes, batch_size):
    """Every adapter's training-step row, each in a fresh process."""
    print(f"\nstage-2 training step, batch {batch_size}\n"
          "| row | dtype | ms/step | samples/s | tokens/s | peak MB | MFU |\n|---|---|---|---|---|---|---|",
          flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for dtype in dtypes:
            for adapter in ADAPTERS:
                subprocess.run([sys.executable, "-m", "tools.bench", "--step-row", adapter, "--dtypes", dtype,
                                "--step-batch", str(batch_size), "--folder", folder], check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["llm", "vit", "qformer", "step"], action="append")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--step-batch", type=int, default=16, help="training-step rows: batch size")
    p.add_argument("--compiled", action="store_true",
                   help="llm rows: also the frozen training step with both models compiled")
    p.add_argument("--step-row", help=argparse.SUPPRESS)   # one step row, in a child process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step_row:
        return bench_step(args.step_row, args.dtypes[0], args.step_batch, args.folder)
    rows = args.only or ["llm", "vit", "qformer", "step"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| row | dtype | ours | reference | unit | ratio |\n|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        if "llm" in rows:
            bench_llm(dtype, args.batch, args.seq, args.compiled)
        if "vit" in rows:
            bench_vit(dtype, args.batch)
        if "qformer" in rows:
            bench_qformer(dtype, args.batch)
    if "step" in rows:
        step_rows(args.dtypes, args.step_batch)


if __name__ == "__main__":
    main()
