"""
Per-GPU training memory of each paper-scale preset (training/presets.py): DDP and FSDP over 8
GPUs, with and without activation checkpointing.

    python -m tools.memory                      # the README's table (stage 2); nothing is allocated
    python -m tools.memory --gpus 4 --stage 1

Each model is built on the meta device as train.py builds it for the preset at --dtype bf16: the
frozen LLM stored in bf16, every component that trains at some stage in fp32
(vlm.trainable_in_fp32_; the frozen ViT stays fp32 too, as loaded), vlm.TRAINABLE's freezing. So
parameter counts and dtypes come from the modules themselves; the hub configs are below.

Per GPU, in bytes:
  weights      every parameter as stored (bf16 frozen LLM: 2 B, the rest: 4 B)
  gradients    fp32, trainable parameters only (DDP's gradients are views of its buckets)
  optimizer    AdamW's exp_avg and exp_avg_sq, fp32: 8 B per trainable parameter
  activations  what the decoder layers keep for the backward pass (decoder_layer_bytes) at the
               preset's batch per GPU x --max-len tokens, the longest a batch can be. With
               checkpointing: each layer's input, plus one layer's activations, recomputed
  bf16 copies  weights that exist only during the step. DDP: autocast's bf16 copies of the
               trainable fp32 matrices, alive from their forward to their backward. FSDP: the
               root unit, gathered in bf16 for the whole step, and two gathered blocks (the
               running one and the prefetched one)
FSDP divides weights, gradients and optimizer state by the GPUs. Not counted: the frozen ViT's
activations (it runs without gradients), the projector's, the Q-Former's and the loss head's
(CROME's Q-Former sees 32 + 128 tokens per sample against the LLM's 2,048), the CUDA context,
and the allocator's fragmentation.
"""
import argparse
from dataclasses import dataclass

import torch
import torch.nn as nn

from adapters import IAAConfig
from model import LLM, LLMConfig
from qformer import QFormer, QFormerConfig
from tools.params import LLAMA3_8B, VICUNA_7B
from training.parallel import blocks
from training.presets import PRESETS, preset
from vit import ViT, ViTConfig
from vlm import VLM, VLMConfig, trainable_in_fp32_

# The presets' backbones, from each hub repo's config.json (tools/params.py has the LLMs').
LLMS = {"lmsys/vicuna-7b-v1.5": VICUNA_7B, "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B}
VISION = {"openai/clip-vit-large-patch14-336": ViTConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14)}   # its vision_config
# bert-base-uncased (12 layers, d 768, FFN 3072) as vlm.load_qformer initialises it: 32
# queries, cross-attention every 2 layers to the ViT's width
QFORMERS = {"google-bert/bert-base-uncased": QFormerConfig(encoder_hidden_size=1024)}
GiB = 2 ** 30


def decoder_layer_bytes(c: LLMConfig, trainable: bool, residual: int) -> int:
    """Bytes a Llama decoder layer (model.Block) keeps for the backward pass, per token, under
    bf16 autocast with a flash attention kernel (no T x T scores). residual: the element size
    of the residual stream (2 bf16, 4 fp32). A frozen layer's linears keep no input: only a
    weight's gradient needs it.
        each RMSNorm            its input in fp32 and 1/rms: 4h + 4, twice
        attention               q and k after rotary, the fused qkv output (v is a view of it),
                                the output, the fp32 logsumexp per head: 6q + 6kv + 4 heads
        SwiGLU                  gate|up (2f) and silu(gate) (f), bf16: 6f
    trainable, besides: each norm's output (for its weight's gradient, in the residual's dtype)
    and the bf16 inputs of qkv, fc and the MLP's proj (attention's proj reads its output):
                                2 (residual h + 2h) + 2f
    with h the width, q = heads x head_dim, kv = kv heads x head_dim, f the MLP's width."""
    h, q, kv, f = c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
    frozen = 2 * (4 * h + 4) + 6 * q + 6 * kv + 4 * c.n_head + 6 * f
    return frozen + (2 * (residual * h + 2 * h) + 2 * f if trainable else 0)


@dataclass
class Row:
    preset: str
    shard: str
    checkpointing: bool
    weights: float       # bytes per GPU
    gradients: float
    optimizer: float
    activations: float
    copies: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.copies


def preset_model(name: str, stage: int) -> VLM:
    """The preset's model on the meta device, dtypes and freezing as a bf16 run has them."""
    v = preset(name).values(stage)
    with torch.device("meta"):
        llm = LLM(LLMS[v["llm"]]).to(torch.bfloat16)
        qformer = QFormer(QFORMERS[v["qformer"]]) if v["adapter"] == "crome" else None
        vcfg = VLMConfig(adapter=v["adapter"], shuffle=v["pixel_shuffle"],
                         iaa=IAAConfig(n_insert=v.get("iaa_layers", IAAConfig.n_insert)))
        vlm = trainable_in_fp32_(VLM(vcfg, llm, ViT(VISION[v["vision"]]), qformer))
    return vlm.set_stage(stage)


def size(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def count(params) -> int:
    return sum(p.numel() for p in params)


def decoder_layers(vlm: VLM) -> list[tuple[nn.Module, bool]]:
    """(layer, trains?) for the frozen LLM's layers and IAA's insertion layers."""
    layers = list(vlm.llm.blocks) + (list(vlm.adapter.layers) if vlm.cfg.adapter == "iaa" else [])
    return [(layer, any(p.requires_grad for p in layer.parameters())) for layer in layers]


def activation_bytes(vlm: VLM, tokens: int, shard: str, checkpointing: bool) -> int:
    """The decoder layers' activations for `tokens` tokens. The residual stream has the dtype
    of the embedding table the LLM reads (fp32 when it trains) under DDP's autocast; bf16 under
    FSDP, which gathers every parameter in bf16."""
    table = vlm.adapter.embed if vlm.cfg.adapter == "iaa" else vlm.llm.wte
    residual = 2 if shard == "fsdp" else table.weight.element_size()
    kept = [decoder_layer_bytes(vlm.llm.config, trains, residual)
            for _, trains in decoder_layers(vlm)]
    if not checkpointing:
        return tokens * sum(kept)
    return tokens * (len(kept) * residual * vlm.llm.config.n_embd + max(kept))


def copy_bytes(vlm: VLM, shard: str) -> int:
    """bf16 weights that live only during the step (see the module docstring)."""
    if shard == "ddp":
        matrices = [m.weight for m in vlm.modules() if isinstance(m, nn.Linear)]
        return 2 * count(p for p in matrices if p.requires_grad and p.dtype == torch.float32)
    units = blocks(vlm)
    in_units = {id(p) for unit in units for p in unit.parameters()}
    root = [p for p in vlm.parameters() if id(p) not in in_units]
    largest = sorted((count(unit.parameters()) for unit in units), reverse=True)[:2]
    return 2 * (count(root) + sum(largest))


def memory(name: str, stage: int, gpus: int) -> list[Row]:
    """The preset's four rows: DDP and FSDP over `gpus`, without and with checkpointing."""
    vlm = preset_model(name, stage)
    v = preset(name).values(stage)
    params = list(vlm.parameters())   # each tensor once
    trainable = count(p for p in params if p.requires_grad)
    rows = []
    for shard in ("ddp", "fsdp"):
        per = gpus if shard == "fsdp" else 1
        for checkpointing in (False, True):
            tokens = v["batch_size"] * v["max_len"]
            rows.append(Row(name, shard, checkpointing, size(params) / per, 4 * trainable / per,
                            8 * trainable / per,
                            activation_bytes(vlm, tokens, shard, checkpointing),
                            copy_bytes(vlm, shard)))
    return rows


def report(stage: int = 2, gpus: int = 8) -> list[Row]:
    return [row for name in PRESETS for row in memory(name, stage, gpus)]


def markdown(rows: list[Row], stage: int, gpus: int) -> str:
    lines = [f"| preset, stage {stage} | sharding | activation checkpointing | weights | "
             "gradients | optimizer | activations | bf16 copies | total |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shard = f"FSDP / {gpus}" if r.shard == "fsdp" else "DDP"
        cells = (r.weights, r.gradients, r.optimizer, r.activations, r.copies, r.total)
        lines.append(f"| `{r.preset}` | {shard} | {'yes' if r.checkpointing else 'no'} | " +
                     " | ".join(f"{c / GiB:.1f}" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs FSDP shards over")
    args = parser.parse_args()
    print(markdown(report(args.stage, args.gpus), args.stage, args.gpus))
