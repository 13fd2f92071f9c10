"""The adapter designs inside the composed VLM, on tiny random backbones built from configs:
what trains and what stays frozen per design and stage, what a stage saves, IAA's untouched
text-only workflow, identity at init, that training moves the loss, KV-cached generation against
a full re-run, MWA on the Q-Former, and the parameter-count report (tools/params.py)."""
import copy
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from adapters import (CROMEAdapter, CROMEConfig, IAAConfig, InnerAdaptor, MWAConfig,
                      add_mwa_to_llm, add_mwa_to_qformer, iaa_insert_after)
from weights.checkpoint import save_safetensors
from data.collate import encode_example, pad_batch
from model import LLM, LLMConfig
from qformer import QFormer, QFormerConfig
from vit import ViT, ViTConfig
from dual_encoder import DualEncoder
from tools import params
from vlm import ADAPTERS, DESIGNS, TRAINABLE, VLM, VLMConfig, saved_components

LLM_CFG = LLMConfig(arch="llama", vocab_size=64, n_layer=7, n_head=4, n_kv_head=2, n_embd=32,
                    head_dim=8, intermediate_size=64, max_position_embeddings=256,
                    tie_word_embeddings=True)
VIT_CFG = ViTConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=4)  # 64 patches -> 16 tokens
QF_CFG = QFormerConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32, num_query_tokens=4,
                       cross_attention_freq=2, encoder_hidden_size=VIT_CFG.hidden_size)
SYSTEM = "Be brief."
QA = [("What colour is the shape?", "red"), ("Which shape?", "a circle")]


class CharTokenizer:
    """The tokenizer interface data.collate needs, over a 64-id vocabulary: ChatML markup as two
    special ids, every other character one id."""
    SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2}
    stop_ids = (2,)

    def render_chat(self, messages, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def decode(self, ids):  # data.collate reads the end-of-turn text back
        names = {i: t for t, i in self.SPECIAL.items()}
        return "".join(names.get(i, "?") for i in ids)

    def encode(self, text, allow_special=False, continuing=False):
        pieces = re.split(r"(<\|im_start\|>|<\|im_end\|>)", text) if allow_special else [text]
        ids = []
        for piece in pieces:
            ids += [self.SPECIAL[piece]] if piece in self.SPECIAL else [3 + ord(c) % 61 for c in piece]
        return ids


def tiny_llm() -> LLM:
    """nn.Embedding's N(0, 1) tied to the head gives logits of std ~6 and a starting loss near
    30; std 0.3 gives a pretrained-like scale (starting loss ~6, log(64) = 4.2)."""
    llm = LLM(LLM_CFG)
    nn.init.normal_(llm.wte.weight, std=0.3)
    return llm


def build_vlm(design, seed=0, llm=None) -> VLM:
    torch.manual_seed(seed)
    llm = llm or tiny_llm()
    qformer = QFormer(QF_CFG) if design == "crome" else None
    cfg = VLMConfig(adapter=design, crome=CROMEConfig(bottleneck=8), iaa=IAAConfig(n_insert=4),
                    mwa=MWAConfig(bottleneck=8))
    return VLM(cfg, llm, ViT(VIT_CFG), qformer)


def make_batch(model, answers=True, seed=0):
    """Training batch (right-padded, labels on the answers) or a left-padded generation prompt."""
    g = torch.Generator().manual_seed(seed)
    tok = CharTokenizer()
    rows = [encode_example(tok, SYSTEM, q, a if answers else None, model.n_visual) for q, a in QA]
    batch = pad_batch(rows, left=not answers)
    B = len(rows)
    batch["pixels"] = torch.randn(B, 3, VIT_CFG.image_size, VIT_CFG.image_size, generator=g)
    if model.cfg.adapter == "crome":
        batch["instr_ids"] = torch.randint(1, QF_CFG.vocab_size, (B, 6), generator=g)
        batch["instr_mask"] = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    return batch


def params_of(module):
    return {id(p): p for p in module.parameters()} if module is not None else {}


def trainable_params(model, stage):
    """id -> parameter for the components TRAINABLE names (MWA's live inside the LLM's blocks)."""
    out = {}
    for name in TRAINABLE[model.cfg.adapter][stage]:
        out |= params_of(getattr(model, name))
    return out


def names(model, ids):
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


# ----------------------------------------------------------------------------- IAA placement


def test_iaa_insert_after_matches_the_released_layouts():
    assert iaa_insert_after(32, 14) == (0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31)
    assert iaa_insert_after(32, 8) == (15, 16, 20, 21, 25, 26, 30, 31)
    assert iaa_insert_after(LLM_CFG.n_layer, 4) == (0, 1, 5, 6)
    for bad in (0, 3, 13, 16, -2):
        with pytest.raises(ValueError):
            iaa_insert_after(32, bad)


# ----------------------------------------------------------------------------- freezing per stage


@pytest.mark.parametrize("stage", (1, 2, 3))
@pytest.mark.parametrize("design", ADAPTERS)
def test_only_the_stage_components_train(design, stage):
    model = build_vlm(design)
    model.set_stage(stage).train()
    train_ids = trainable_params(model, stage)
    everything = params_of(model)

    # frozen modules (the whole LLM and ViT included) stay in eval mode under model.train()
    train_modules = {id(m) for c in TRAINABLE[design][stage] for m in getattr(model, c).modules()}
    wrong = [n for n, m in model.named_modules()
             if n and m.training != (id(m) in train_modules)]
    assert not wrong, f"{design} stage {stage}: wrong train/eval mode: {wrong[:8]}"

    requires = {i for i, p in everything.items() if p.requires_grad}
    assert requires == set(train_ids), \
        f"requires_grad mismatch: extra {names(model, requires - set(train_ids))}, " \
        f"missing {names(model, set(train_ids) - requires)}"

    model(make_batch(model)).backward()
    with_grad = {i for i, p in everything.items() if p.grad is not None}
    expected = set(train_ids)
    assert with_grad == expected, \
        f"{design} stage {stage}: unexpected grads {names(model, with_grad - expected)}, " \
        f"missing grads {names(model, expected - with_grad)}"

    before = {i: p.detach().clone() for i, p in everything.items()}
    torch.optim.AdamW(list(train_ids.values()), lr=1e-2, weight_decay=0.01).step()
    changed = {i for i, p in everything.items() if not torch.equal(p, before[i])}
    assert changed <= set(train_ids), f"frozen weights moved: {names(model, changed - set(train_ids))}"
    # AdamW moves every weight with a nonzero gradient; zero-initialised ones whose gradient is
    # zero too (e.g. MWA's image-way adapter in the last layer: no logits at image positions) stay
    pushed = {i for i in expected if everything[i].grad.abs().max() > 0}
    assert changed >= pushed, f"trainable weights did not move: {names(model, pushed - changed)}"
    frozen_base = (params_of(model.llm) | params_of(model.vision)).keys() - train_ids.keys()
    assert frozen_base and all(torch.equal(everything[i], before[i]) for i in frozen_base)


@pytest.mark.parametrize("stage", (1, 2, 3))
@pytest.mark.parametrize("design", ADAPTERS)
def test_trainable_state_holds_the_saved_components_only(design, stage, tmp_path):
    model = build_vlm(design)
    model.set_stage(stage)
    state = model.trainable_state()
    saved = saved_components(design, stage)
    assert {k.split(".", 1)[0] for k in state} == set(saved)
    want = {p.data_ptr() for c in saved for p in getattr(model, c).parameters()}
    assert {v.data_ptr() for v in state.values()} == want
    adapter_ids = params_of(model.adapter).keys() if model.adapter else set()
    frozen = params_of(model.vision) | ({} if "llm" in saved else params_of(model.llm))
    base = [p for i, p in frozen.items() if i not in adapter_ids]
    assert not {p.data_ptr() for p in base} & want, "a frozen LLM or vision weight would be saved"
    save_safetensors(state, tmp_path / "model.safetensors")
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_iaa_refuses_duplicate_insertion_points():
    with pytest.raises(ValueError, match=r"frozen layer\(s\) \[1, 5\] more than once"):
        InnerAdaptor(tiny_llm(), IAAConfig(insert_after=(1, 5, 1, 5, 6)))


def test_iaa_cache_keeps_each_stacks_dtype():
    """A bf16 frozen LLM with an fp32 adaptor (as build_vlm makes them for bf16 training): the
    frozen layers' cache slots are bf16, the insertion layers' fp32, and autocast decoding
    writes both."""
    torch.manual_seed(0)
    model = build_vlm("iaa", llm=tiny_llm().to(torch.bfloat16))
    model.adapter.float()
    model.projector.float()
    model.set_stage(2).eval()
    n, inserted = LLM_CFG.n_layer, len(model.adapter.layers)
    cache = model.adapter.new_cache(model.llm, 2, 40)
    assert [k.dtype for k in cache.k] == [torch.bfloat16] * n + [torch.float32] * inserted
    assert [v.dtype for v in cache.v] == [k.dtype for k in cache.k]
    caches = []
    new_cache = model.adapter.new_cache
    model.adapter.new_cache = lambda *a: caches.append(new_cache(*a)) or caches[-1]
    batch = make_batch(model, answers=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(batch, max_new_tokens=3)
    assert len(out) == 2 and all(1 <= len(row) <= 3 for row in out)
    (used,) = caches
    assert [k.dtype for k in used.k] == [torch.bfloat16] * n + [torch.float32] * inserted
    assert all(k[:, :, :used.pos].abs().sum() > 0 for k in used.k)


# ----------------------------------------------------------------------------- IAA text-only


def test_iaa_text_only_workflow_is_the_base_llm():
    torch.manual_seed(0)
    llm = tiny_llm().eval()
    idx = torch.randint(0, LLM_CFG.vocab_size, (2, 12))
    with torch.no_grad():
        before = llm(idx)
    model = build_vlm("iaa", llm=llm)
    model.set_stage(2).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch(model)
    for _ in range(3):
        model(batch).backward()
        opt.step()
        opt.zero_grad()
    inserted = model.adapter.layers[0].attn.qkv.weight
    assert not torch.equal(inserted, llm.blocks[model.adapter.insert_after[0]].attn.qkv.weight)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(a[0])) for m in model.adapter.modules()]
    with torch.no_grad():
        after = llm(idx)
    for h in hooks:
        h.remove()
    assert not calls, "the text-only workflow ran InnerAdaptor modules"
    assert (after - before).abs().max().item() == 0.0


# ----------------------------------------------------------------------------- identity at init


def test_iaa_multimodal_workflow_starts_as_the_base_llm():
    """init="identity": every insertion layer is x + 0 + 0, so the untrained multimodal
    workflow (its own copied embedding and head) computes the base LLM exactly; "copy" (the
    default) runs each inserted layer's frozen twin once more and differs."""
    torch.manual_seed(0)
    llm = tiny_llm().eval()
    idx = torch.randint(0, LLM_CFG.vocab_size, (2, 12))
    with torch.no_grad():
        base = llm(idx)
        identity = InnerAdaptor(llm, IAAConfig(n_insert=4, init="identity"))(llm, idx=idx)
        copied = InnerAdaptor(llm, IAAConfig(n_insert=4))(llm, idx=idx)
    assert torch.equal(identity, base)
    assert (copied - base).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="IAA init must be"):
        InnerAdaptor(llm, IAAConfig(n_insert=4, init="zeros"))


def test_crome_adapter_is_the_identity_at_init():
    adapter = CROMEAdapter(32, CROMEConfig(bottleneck=8))
    image, text = torch.randn(2, 4, 32), torch.randn(2, 3, 32)
    out_image, out_text = adapter(image, text)
    assert torch.equal(out_image, image) and torch.equal(out_text, text)
    with torch.no_grad():
        adapter.up.weight.normal_()
    assert not torch.equal(adapter(image, text)[0], image)


def test_mwa_wrapped_llm_equals_the_llm_at_init():
    torch.manual_seed(0)
    ref = tiny_llm().eval()
    llm = copy.deepcopy(ref)
    new = add_mwa_to_llm(llm, MWAConfig(bottleneck=8, ae_layers="all"))
    llm.train()  # dropout on, the zero-initialised outputs still cancel it
    idx = torch.randint(0, LLM_CFG.vocab_size, (2, 10))
    ways = torch.zeros(2, 10, dtype=torch.long)
    ways[:, 4:8] = 1
    with torch.no_grad():
        assert (llm(idx, ways=ways) - ref(idx)).abs().max().item() <= 1e-6
        new[3]["adapters"][1].up.bias.fill_(0.5)  # image way of one layer only
        moved = llm.eval()(idx, ways=ways)
        base = ref(idx)
    assert torch.equal(moved[:, :4], base[:, :4]), "text tokens before the image changed"
    assert (moved[:, 4:] - base[:, 4:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- learning


# IAA and MWA change the LLM's computation and fit the tiny batch almost exactly. CROME steers the
# frozen LLM only through its visual prefix (like prompt tuning), and a random tiny LLM attends
# almost uniformly, so the prefix reaches less: its loss plateaus near 0.7x within these steps.
MAX_LOSS_RATIO = {"crome": 0.85, "iaa": 0.3, "mwa": 0.3}


@pytest.mark.parametrize("design", DESIGNS)
def test_a_few_steps_reduce_the_loss(design):
    model = build_vlm(design)
    model.set_stage(2)
    batch = make_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        first = model.eval()(batch).item()
    model.train()
    for _ in range(25):
        model(batch).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        last = model.eval()(batch).item()
    assert last < MAX_LOSS_RATIO[design] * first, f"{design}: loss {first:.3f} -> {last:.3f}"


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("design", DESIGNS)
def test_cached_generation_equals_full_recompute(design):
    model = build_vlm(design)
    model.set_stage(2).eval()
    with torch.no_grad():  # move the zero-initialised paths off the identity
        for p in model.adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = make_batch(model, answers=False)
    steps = 6

    recorded, run_llm = [], model.run_llm
    model.run_llm = lambda *a, **kw: recorded.append(run_llm(*a, **kw)) or recorded[-1]
    cached = model.generate(batch, max_new_tokens=steps)
    del model.run_llm

    table = model.adapter.embed if design == "iaa" else model.llm.wte
    with torch.no_grad():
        x, mask = model.embed(batch), batch["attn_mask"]
        ways, full = batch["image_mask"].long(), []
        for i in range(steps):
            logits = model.run_llm(x, ways, attn_mask=mask)[:, -1]          # (B, V)
            assert (logits - recorded[i]).abs().max() < 1e-4, f"{design}: step {i} logits differ"
            nxt = logits.argmax(-1)
            full.append(nxt)
            x = torch.cat([x, table(nxt)[:, None]], dim=1)
            ways = torch.cat([ways, ways.new_zeros(len(nxt), 1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(nxt), 1)], dim=1)
    assert cached == torch.stack(full, dim=1).tolist()
    if design == "iaa":
        assert len(model.adapter.new_cache(model.llm, 1, 4).k) == LLM_CFG.n_layer + 4


# ----------------------------------------------------------------------------- MWA on the Q-Former


def test_mwa_on_qformer_starts_unchanged_and_trains_only_new_modules():
    torch.manual_seed(0)
    vision, qformer = ViT(VIT_CFG), QFormer(QF_CFG)
    ref = copy.deepcopy(qformer).eval()
    new = add_mwa_to_qformer(qformer, MWAConfig(bottleneck=8, ae_layers="last1"))
    image = torch.randn(3, 17, VIT_CFG.hidden_size)
    ids, mask = torch.randint(1, QF_CFG.vocab_size, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        qformer.eval()
        assert (qformer(image) - ref(image)).abs().max() <= 1e-6
        assert (qformer(None, ids, mask) - ref(None, ids, mask)).abs().max() <= 1e-6
        assert (qformer(image, ids, mask) - ref(image, ids, mask)).abs().max() <= 1e-6

    dual = DualEncoder(vision, qformer, embed_dim=8)
    dual.requires_grad_(False)
    new.requires_grad_(True)
    pixels = torch.randn(3, 3, VIT_CFG.image_size, VIT_CFG.image_size)
    dual.train()({"pixels": pixels, "text_pooled": dual.text_pooled(ids, mask),
                  "caption_ids": torch.tensor([0, 1, 0])}).backward()
    with_grad, new_ids = {id(p) for p in dual.parameters() if p.grad is not None}, set(params_of(new))
    assert with_grad == new_ids, f"grads differ from the new modules on " \
        f"{sorted(n for n, p in dual.named_parameters() if (id(p) in with_grad) != (id(p) in new_ids))}"
    assert any(p.grad.abs().sum() > 0 for p in new.parameters())


# ----------------------------------------------------------------------------- parameter report


def test_parameter_report():
    rows = {(r.design, r.setting): r for r in params.report()}
    crome = rows[("crome", "adapter, Vicuna-13B (d 5120, r 195)")]
    assert abs(crome.trainable - 5.0e6) <= 0.05 * 5.0e6
    d, kv, f = 4096, 8 * 128, 14336  # one Llama-3-8B decoder layer, by hand
    layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    iaa = {part: rows[("iaa", f"IAA-14 {part}, Llama-3-8B")].trainable
           for part in ("insertion layers", "MM-EL", "MM-norm", "MM-LH", "trainable total")}
    assert iaa["insertion layers"] == 14 * layer
    assert iaa["MM-EL"] == iaa["MM-LH"] == 128256 * d and iaa["MM-norm"] == d
    assert iaa["trainable total"] == sum(v for k, v in iaa.items() if k != "trainable total")
    mwa = [r for r in rows.values() if r.design == "mwa" and r.setting.startswith("Q-Former")]
    assert [r.trainable for r in mwa] == sorted(r.trainable for r in mwa)  # more AE, more params
    assert all(r.trainable < r.total for r in rows.values())
    assert "| design |" in params.markdown(list(rows.values()))
