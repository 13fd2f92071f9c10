"""tools/memory.py: its per-layer activation formula against what autograd really keeps for a
small Llama block, the table's own consistency (FSDP = DDP / GPUs for what FSDP shards, AdamW =
8 B and gradients 4 B per trainable parameter), and that the README shows the command's table."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

import model
from model import LLM, LLMConfig
from tools import memory
from training.presets import PRESETS
from vlm import TRAINABLE

ROOT = Path(__file__).resolve().parents[1]
SMALL = LLMConfig(vocab_size=100, n_layer=1, n_head=4, n_kv_head=2, n_embd=64, head_dim=16,
                  intermediate_size=96)


@pytest.mark.parametrize("trainable, dtype", [(False, torch.bfloat16),   # a frozen bf16 LLM
                                              (True, torch.float32),     # trains, DDP + autocast
                                              (True, torch.bfloat16)])   # trains, FSDP in bf16
def test_decoder_layer_bytes_is_what_autograd_keeps(trainable, dtype, monkeypatch):
    """One block under bf16 autocast on the CPU (whose attention kernel keeps what flash
    attention keeps; the plain kernel, as on a GPU, not precision.sdpa's fp32 detour): every
    tensor saved for backward, parameters aside, is the formula's, the rotary tables that all
    layers share, or (fp32 weights that train) autocast's bf16 copies of the weight matrices."""
    monkeypatch.setattr(model, "sdpa", F.scaled_dot_product_attention)
    llm = LLM(SMALL).to(dtype).requires_grad_(trainable)
    B, T = 2, 32
    x = torch.randn(B, T, SMALL.n_embd, dtype=dtype, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in llm.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, ctx = llm.context(x, torch.arange(T).expand(B, T))
        with saved_tensors_hooks(pack, lambda t: t):
            llm.blocks[0](x, ctx)
    rotary = ctx.cos.untyped_storage().nbytes() + ctx.sin.untyped_storage().nbytes()
    matrices = [m.weight for m in llm.blocks[0].modules() if isinstance(m, nn.Linear)]
    copies = 2 * sum(w.numel() for w in matrices) if dtype == torch.float32 else 0
    per_token = memory.decoder_layer_bytes(SMALL, trainable, x.element_size())
    assert sum(kept.values()) == B * T * per_token + rotary + copies


@pytest.fixture(scope="module")
def rows():
    return memory.report(stage=2, gpus=8)


@pytest.mark.parametrize("name", PRESETS)
def test_the_table_is_consistent(rows, name):
    ddp, ddp_ac, fsdp, fsdp_ac = [r for r in rows if r.preset == name]
    vlm = memory.preset_model(name, 2)
    trainable = memory.count({id(p): p for c in TRAINABLE[vlm.cfg.adapter][2]
                              for p in getattr(vlm, c).parameters()}.values())
    llm = memory.count(vlm.llm.parameters())
    llm_bytes = 4 if "llm" in TRAINABLE[vlm.cfg.adapter][2] else 2   # frozen: bf16
    assert ddp.weights == llm_bytes * llm + 4 * (memory.count(vlm.parameters()) - llm)
    assert (ddp.gradients, ddp.optimizer) == (4 * trainable, 8 * trainable)
    for sharded, whole in ((fsdp, ddp), (fsdp_ac, ddp_ac)):
        for part in ("weights", "gradients", "optimizer"):
            assert getattr(sharded, part) * 8 == getattr(whole, part)
    for ac, plain in ((ddp_ac, ddp), (fsdp_ac, fsdp)):
        assert ac.activations < plain.activations / 5 and ac.copies == plain.copies


def test_iaa14_needs_sharding_to_fit_80_gb(rows):
    """Issue 12: under DDP, IAA-14's weights, gradients and AdamW state alone pass 80 GB before
    any activation; sharded over 8 GPUs with activation checkpointing, everything fits."""
    ddp, _, _, fsdp_ac = [r for r in rows if r.preset == "iaa14-llama3-8b"]
    assert ddp.weights + ddp.gradients + ddp.optimizer > 80e9 > fsdp_ac.total


def test_the_readme_shows_the_commands_table(rows):
    assert memory.markdown(rows, 2, 8) in (ROOT / "README.md").read_text()
