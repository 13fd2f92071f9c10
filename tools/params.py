"""
How many parameters each adapter design trains, at the papers' scale and for the offline default.

    python -m tools.params    # prints a markdown table; nothing is allocated (meta device)

Every model is built on the meta device, so the 13B- and 8B-shaped LLMs cost no memory and the
counts come from the very modules the code trains, not from formulas. Tied weights count once.

Paper-scale rows count the frozen LLM plus the design's own modules (no vision tower or connector):
CROME's adapter at Vicuna-13B / 7B width (the paper's "~5M"), IAA's parts on Llama-3-8B (the
released IAA-8 / IAA-14), and MWA on a BERT-base-shaped multiway encoder (the BLIP-2 Q-Former: shared
self-attention, a query FFN and a text FFN), where the paper claims +2-3% parameters. The offline rows
are the whole default model (SmolLM2-135M + small ViT + MiniLM-shaped Q-Former) with the components
vlm.TRAINABLE trains at each stage.
"""
from dataclasses import dataclass

import torch

from adapters import (CROMEAdapter, CROMEConfig, IAAConfig, InnerAdaptor, MWAConfig,
                      add_mwa_to_qformer)
from model import LLM, LLMConfig
from qformer import QFormer, QFormerConfig
from dual_encoder import OFFLINE_QUERIES
from dual_encoder import OFFLINE_VIT as OFFLINE_VIT_FIELDS
from training.config import TrainConfig
from vit import ViT, ViTConfig
from vlm import TRAINABLE, VLM, VLMConfig

VICUNA_13B = LLMConfig(vocab_size=32000, n_layer=40, n_head=40, n_kv_head=40, n_embd=5120,
                       head_dim=128, intermediate_size=13824, tie_word_embeddings=False)
VICUNA_7B = LLMConfig(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096,
                      head_dim=128, intermediate_size=11008, tie_word_embeddings=False)
LLAMA3_8B = LLMConfig(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                      head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                      tie_word_embeddings=False)
BERT_BASE_QFORMER = QFormerConfig()  # BLIP-2's: 12 layers, d 768, FFN 3072, 32 queries, 2 FFN ways
# The offline default: dual_encoder.py's ViT, and its Q-Former initialised from MiniLM (all-MiniLM-L6-v2).
OFFLINE_VIT = ViTConfig(**OFFLINE_VIT_FIELDS)
OFFLINE_QFORMER = QFormerConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536, num_query_tokens=OFFLINE_QUERIES,
                                cross_attention_freq=2, encoder_hidden_size=OFFLINE_VIT.hidden_size)


@dataclass
class Row:
    design: str
    setting: str
    trainable: int
    total: int


def count(*modules) -> int:
    """Parameters of the given modules, each tensor once (tied weights, shared submodules)."""
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


def crome_rows():
    rows = []
    for name, cfg, r in (("Vicuna-13B", VICUNA_13B, 195), ("Vicuna-7B", VICUNA_7B, 195),
                         ("Vicuna-7B", VICUNA_7B, 244)):
        llm, adapter = LLM(cfg), CROMEAdapter(cfg.n_embd, CROMEConfig(bottleneck=r))
        rows.append(Row("crome", f"adapter, {name} (d {cfg.n_embd}, r {r})", count(adapter),
                        count(llm, adapter)))
    return rows


def iaa_rows():
    """IAA's trainable parts on Llama-3-8B, each counted on its own, then together."""
    llm, rows = LLM(LLAMA3_8B), []
    for n in (8, 14):
        iaa = InnerAdaptor(llm, IAAConfig(n_insert=n))
        total = count(llm, iaa)
        parts = {"insertion layers": iaa.layers, "MM-EL": iaa.embed, "MM-norm": iaa.norm_f,
                 "MM-LH": iaa.lm_head}
        rows += [Row("iaa", f"IAA-{n} {part}, Llama-3-8B", count(m), total)
                 for part, m in parts.items()]
        rows.append(Row("iaa", f"IAA-{n} trainable total, Llama-3-8B", count(iaa), total))
    return rows


def mwa_rows():
    """NKE adapters everywhere, the Alignment Enhancer on none / the last 2 / all layers."""
    rows = []
    for ae, ratio in (("none", 1), ("last2", 1), ("last2", 4), ("all", 1), ("all", 4)):
        qformer = QFormer(BERT_BASE_QFORMER)
        new = add_mwa_to_qformer(qformer, MWAConfig(ae_layers=ae, ae_ratio=ratio))
        setting = f"Q-Former/BERT-base multiway, AE {ae}" + (f", width {ratio}d" if ae != "none" else "")
        rows.append(Row("mwa", setting, count(new), count(qformer)))
    return rows


def offline_vlm(design, **sub) -> VLM:
    llm, vision = LLM(LLMConfig()), ViT(OFFLINE_VIT)
    qformer = QFormer(OFFLINE_QFORMER) if design == "crome" else None
    return VLM(VLMConfig(adapter=design, shuffle=TrainConfig.pixel_shuffle, **sub), llm, vision, qformer)


def offline_rows():
    """The whole offline model; trainable = what vlm.TRAINABLE trains at that stage."""
    settings = [("crome", 1, {}), ("crome", 2, {}), ("crome", 3, {}),
                ("iaa", 2, {"iaa": IAAConfig(n_insert=4)}), ("iaa", 2, {"iaa": IAAConfig(n_insert=8)}),
                ("mwa", 2, {})]
    rows = []
    for design, stage, sub in settings:
        vlm = offline_vlm(design, **sub)
        trains = TRAINABLE[design][stage]
        extra = f"IAA-{sub['iaa'].n_insert}, " if sub else ""
        rows.append(Row(design, f"offline SmolLM2-135M, {extra}stage {stage}: {' + '.join(trains)}",
                        count(*(getattr(vlm, c) for c in trains)), count(vlm)))
    return rows


def report() -> list[Row]:
    with torch.device("meta"):
        return crome_rows() + iaa_rows() + mwa_rows() + offline_rows()


def markdown(rows) -> str:
    lines = ["| design | setting | trainable params | total params | trainable % |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r.design} | {r.setting} | {r.trainable:,} | {r.total:,} | "
              f"{100 * r.trainable / r.total:.3f} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(report()))
