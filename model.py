"""
The frozen decoder LLM that every adapter design plugs into, and its loader.

One readable decoder covers the two families people plug into these adapters:
- Llama family (Llama 2/3.x, SmolLM2, Qwen2/2.5): RMSNorm, rotary embeddings (with Llama-3's
  `llama3` frequency scaling), grouped-query attention, SwiGLU, optional q/k/v bias (Qwen2).
- GPT-2: LayerNorm, learned positions, GELU (tanh), Conv1D weights stored [in, out].

References: the Llama and GPT-2 papers, and the hub checkpoints' key names. Our q/k/v (and the
SwiGLU gate/up) are fused into one matmul; the loader concatenates the hub's separate tensors.

The adapters need more than `llm(idx)`: they splice image tokens into `inputs_embeds`, ask for
logits only where the loss needs them (`logits_at`), and IAA runs its own layers in between
the frozen ones. So forward() is built from public pieces: `embed`, `context`, the blocks, and
`logits`, which the adapters reuse.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from precision import sdpa
from weights.checkpoint import (CheckpointError, load_strict, read_config, read_state_dict,
                                remap, resolve_checkpoint)


@dataclass
class LLMConfig:
    arch: str = "llama"              # "llama" (Llama, SmolLM2, Qwen2) or "gpt2"
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embd: int = 576
    head_dim: int = 64
    intermediate_size: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None  # Llama-3: {"rope_type": "llama3", "factor", ...}
    max_position_embeddings: int = 8192
    attn_bias: bool = False           # Qwen2 has q/k/v biases
    tie_word_embeddings: bool = True
    bos_id: int | None = None
    eos_id: int | list | None = None

    @classmethod
    def from_hf(cls, hf: dict) -> "LLMConfig":
        """From a hub config.json (llama / qwen2 / mistral-style, or gpt2)."""
        kind = hf.get("model_type")
        if kind == "gpt2":
            return cls(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_kv_head=hf["n_head"], n_embd=hf["n_embd"],
                       head_dim=hf["n_embd"] // hf["n_head"],
                       intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), rope_theta=0.0,
                       max_position_embeddings=hf["n_positions"], attn_bias=True,
                       tie_word_embeddings=hf.get("tie_word_embeddings", True),
                       bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))
        if kind not in ("llama", "qwen2", "mistral"):
            raise CheckpointError(f"unsupported model_type {kind!r}: expected llama, qwen2, "
                                  "mistral or gpt2")
        # transformers >= 5 writes rope settings as `rope_parameters`; hub files have
        # `rope_theta` (+ `rope_scaling`). Read both.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                             else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3",):
            raise CheckpointError(f"unsupported rope scaling {scaling!r} (only llama3)")
        n_head = hf["num_attention_heads"]
        return cls(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                   n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                   n_embd=hf["hidden_size"],
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                   intermediate_size=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
                   rope_theta=float(theta), rope_scaling=scaling,
                   max_position_embeddings=hf.get("max_position_embeddings", 8192),
                   attn_bias=kind == "qwen2" or hf.get("attention_bias", False),
                   tie_word_embeddings=hf.get("tie_word_embeddings", False),
                   bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 and cast back, as the reference does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(cfg: LLMConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3's piecewise rescaling when configured:
    long wavelengths are divided by `factor`, short ones kept, and the band in between blended."""
    exponents = torch.arange(0, cfg.head_dim, 2, device="cpu").float() / cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** exponents
    if not cfg.rope_scaling:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_len / low, inv_freq / factor,
                       torch.where(wavelen < old_len / high, inv_freq, blended))


def apply_rope(x, cos, sin):
    """x: (B, n_head, T, hd); cos/sin: (B, 1, T, hd): the hub's half-split (rotate_half) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class AttnContext:
    """Everything a block needs besides its input: rotary cos/sin, the attention mask, and the
    KV cache. Built once per forward by LLM.context() and shared by all layers (IAA's too)."""
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    mask: torch.Tensor | None     # (B, 1, T, S) bool, True = may attend; None = plain causal
    cache: "KVCache | None" = None
    ways: torch.Tensor | None = None  # (B, T) modality id per token, read by MWA blocks only


class KVCache:
    """Keys and values for every attention layer, preallocated to max_len. `pos` is how many
    positions are filled; the model advances it once per forward, after all layers ran."""

    def __init__(self, n_layers, batch, n_kv_head, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = 0

    def update(self, layer, k, v):
        """Store k, v (B, n_kv, T, hd) at the current position; return all keys/values so far."""
        T = k.shape[2]
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]


class PrefixCache:
    """The keys and values of a prefix every row of a batch shares (a KVCache of batch 1, filled
    to its max_len), broadcast to all rows: KVCache's read side for training. Nothing is written
    in place, so autograd runs through the new positions as usual; the prefix has no gradient."""

    def __init__(self, cache: KVCache):
        self.k, self.v, self.pos = cache.k, cache.v, cache.pos

    def update(self, layer, k, v):
        """k, v (B, n_kv, T, hd) -> the prefix's and theirs, (B, n_kv, pos + T, hd)."""
        B = k.shape[0]
        prefix_k = self.k[layer].to(k.dtype).expand(B, -1, -1, -1)       # (B, n_kv, pos, hd)
        prefix_v = self.v[layer].to(v.dtype).expand(B, -1, -1, -1)
        return torch.cat((prefix_k, k), dim=2), torch.cat((prefix_v, v), dim=2)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (n_kv_head <= n_head), fused q/k/v."""

    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, qkv_out, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.arch == "gpt2")

    def forward(self, x, ctx: AttnContext):
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv(x).split([cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim,
                                     cfg.n_kv_head * cfg.head_dim], dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if ctx.cos is not None:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)                # (B, nkv, S, hd)
        # without a cache every query may see its own past (T == 1 included): a plain bool
        # even when torch.compile traces T as a symbol; a cached single-token step sees it all
        causal = ctx.mask is None and (ctx.cache is None or T > 1)
        y = sdpa(q, k, v, attn_mask=ctx.mask, is_causal=causal,
                 enable_gqa=cfg.n_kv_head != cfg.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))          # (B, T, C)


class MLP(nn.Module):
    """SwiGLU (Llama: down(silu(gate) * up), gate and up fused) or GPT-2's GELU-tanh MLP."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        hidden = 2 * cfg.intermediate_size if self.swiglu else cfg.intermediate_size
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=not self.swiglu)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=not self.swiglu)

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(h, approximate="tanh"))


def make_norm(cfg: LLMConfig):
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.arch == "llama" else \
        nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm_1(x)), then + mlp(norm_2(x))."""

    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.norm_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx: AttnContext):
        x = x + self.attn(self.norm_1(x), ctx)
        return x + self.mlp(self.norm_2(x))


# ----------------------------------------------------------------------------- the model

class LLM(nn.Module):
    """A decoder-only LLM (Llama family or GPT-2) with a KV cache and sampling."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.n_embd) \
            if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        # Kept in fp32 outside the state dict, so .to(bfloat16) cannot round the frequencies.
        self.inv_freq = rope_frequencies(cfg) if cfg.arch == "llama" else None

    def embed(self, idx):
        return self.wte(idx)  # (B, T, C)

    def context(self, x, positions, attn_mask=None, cache=None):
        """Adds learned positions (GPT-2) and builds the shared AttnContext.
        x: (B, T, C) embeddings; positions: (B, T) absolute positions; attn_mask: (B, S) with
        1 for real tokens over all S = cached + new positions, or None when nothing is padded."""
        cos = sin = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            inv_freq = self.inv_freq.to(positions.device)
            angles = positions[:, None, :, None].float() * inv_freq      # (B, 1, T, hd/2)
            angles = torch.cat((angles, angles), dim=-1)                  # (B, 1, T, hd)
            cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        if attn_mask is None and cache is not None and cache.pos > 0 and x.shape[1] > 1:
            attn_mask = positions.new_ones(x.shape[0], cache.pos + x.shape[1])  # chunked prefill
        mask = None if attn_mask is None else attention_mask(positions, attn_mask, cache)
        return x, AttnContext(cos, sin, mask, cache)

    def logits(self, x, logits_at=None):
        """Final norm + LM head, only at the positions where logits_at (B, T) is True -> (N, V);
        everywhere -> (B, T, V) when logits_at is None."""
        if logits_at is not None:
            x = x[logits_at]  # (N, C)
        return self.lm_head(self.norm_f(x))

    def forward(self, idx=None, inputs_embeds=None, positions=None, attn_mask=None,
                cache=None, logits_at=None, ways=None):
        """idx: (B, T) token ids, or inputs_embeds: (B, T, C). Returns logits (B, T, V), or
        (N, V) at the positions selected by logits_at. ways (B, T): per-token modality, read
        only by MWA-wrapped blocks."""
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds
        if positions is None:
            positions = default_positions(x, attn_mask, cache)
        x, ctx = self.context(x, positions, attn_mask, cache)
        ctx.ways = ways
        for block in self.blocks:
            x = block(x, ctx)
        if cache is not None:
            cache.pos += x.shape[1]
        return self.logits(x, logits_at)

    def new_cache(self, batch, max_len, dtype=None, device=None):
        cfg, ref = self.config, self.wte.weight
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim,
                       dtype or ref.dtype, device or ref.device)

    @torch.no_grad()
    def prefix_cache(self, ids) -> PrefixCache:
        """The keys and values of the token ids (P,), for rows that all begin with them."""
        cache = self.new_cache(1, len(ids))
        self(idx=ids[None], cache=cache, logits_at=torch.zeros_like(ids[None], dtype=torch.bool))
        return PrefixCache(cache)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens=64, attn_mask=None, **sampling):
        """Continue idx (B, T) (left-padded when attn_mask marks pads). See generate()."""
        return generate(self, self.new_cache, idx=idx, attn_mask=attn_mask,
                        max_new_tokens=max_new_tokens, **sampling)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None) -> "LLM":
        """Load a hub checkpoint (local folder or repo id) strictly; see hub_key_map()."""
        folder = resolve_checkpoint(name_or_path)
        cfg = LLMConfig.from_hf(read_config(folder))
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")
        if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie again
            model.lm_head.weight = model.wte.weight
        hub_state = read_state_dict(folder)
        mapping, ignore = hub_key_map(cfg, hub_state)
        state = remap(hub_state, mapping, ignore, source=str(folder))
        load_strict(model, state, source=str(folder))
        model.requires_grad_(False).eval()
        return model.to(device=device, dtype=dtype)


def default_positions(x, attn_mask, cache):
    """Positions (B, T): counting only real tokens when attn_mask (B, S) marks left padding."""
    B, T = x.shape[:2]
    start = cache.pos if cache is not None else 0
    if attn_mask is None:
        return torch.arange(start, start + T, device=x.device).expand(B, T)
    return (attn_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]


def attention_mask(positions, attn_mask, cache):
    """(B, 1, T, S) bool: query t sees key s if s is not padding and s <= t in sequence order.
    Each query also sees itself, so rows of padding never become all-False (NaN in SDPA)."""
    T, S = positions.shape[1], attn_mask.shape[1]
    start = cache.pos if cache is not None else 0
    q_idx = torch.arange(start, start + T, device=attn_mask.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=attn_mask.device)[None, :]                 # (1, S)
    mask = (k_idx <= q_idx) & attn_mask.bool()[:, None, None, :]              # (B, 1, T, S)
    return mask | (k_idx == q_idx)


def hub_key_map(cfg: LLMConfig, hub_state: dict):
    """our key -> hub key(s) for one checkpoint, and the rule for hub tensors we skip on
    purpose. The one odd case: GPT-2's Conv1D stores weights [in, out], so they are transposed."""
    if cfg.arch == "gpt2":
        prefix = "transformer." if "transformer.wte.weight" in hub_state else ""
        t = lambda w: w.t()  # noqa: E731  (Conv1D [in, out] -> Linear [out, in])
        m = {"wte.weight": prefix + "wte.weight", "wpe.weight": prefix + "wpe.weight",
             "norm_f.weight": prefix + "ln_f.weight", "norm_f.bias": prefix + "ln_f.bias"}
        for i in range(cfg.n_layer):
            h, o = f"{prefix}h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                m[o + ours + ".weight"], m[o + ours + ".bias"] = h + theirs + ".weight", h + theirs + ".bias"
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                m[o + ours + ".weight"] = (h + theirs + ".weight", t)
                m[o + ours + ".bias"] = h + theirs + ".bias"
        # attn.bias / attn.masked_bias are causal-mask buffers, not weights; a tied head is wte.
        ignore = lambda k: k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight"  # noqa: E731
    else:
        cat = lambda *ws: torch.cat(ws, dim=0)  # noqa: E731
        m = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
        for i in range(cfg.n_layer):
            h, o = f"model.layers.{i}.", f"blocks.{i}."
            a = h + "self_attn."
            m[o + "norm_1.weight"] = h + "input_layernorm.weight"
            m[o + "norm_2.weight"] = h + "post_attention_layernorm.weight"
            m[o + "attn.qkv.weight"] = ([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], cat)
            if cfg.attn_bias:
                m[o + "attn.qkv.bias"] = ([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], cat)
            m[o + "attn.proj.weight"] = a + "o_proj.weight"
            m[o + "mlp.fc.weight"] = ([h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], cat)
            m[o + "mlp.proj.weight"] = h + "mlp.down_proj.weight"
        # Old Llama files carry rotary inv_freq buffers; we compute them from the config.
        ignore = lambda k: k.endswith("rotary_emb.inv_freq") or (  # noqa: E731
            cfg.tie_word_embeddings and k == "lm_head.weight")
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    else:
        m["lm_head.weight"] = m["wte.weight"]  # tied: one tensor, two names in our state dict
    return m, ignore


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, new_cache, idx=None, inputs_embeds=None, attn_mask=None, max_new_tokens=64,
             temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None):
    """Prefill once, then decode token by token with a KV cache. `model(idx=..,
    inputs_embeds=.., attn_mask=.., cache=.., logits_at=..)` is the LLM or anything with the
    same call (IAA's multimodal workflow); `new_cache(batch, max_len)` makes its cache.
    Returns a list per row of the new token ids, each cut after its first stop id."""
    x = idx if inputs_embeds is None else inputs_embeds
    B, T = x.shape[:2]
    device = x.device
    cache = new_cache(B, T + max_new_tokens)
    mask = attn_mask
    last = torch.zeros(B, T, dtype=torch.bool, device=device)
    last[:, -1] = True
    logits = model(idx=idx, inputs_embeds=inputs_embeds, attn_mask=mask, cache=cache,
                   logits_at=last)                                      # (B, V)
    stop = torch.tensor(list(stop_ids), device=device)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        out.append(nxt)
        done |= torch.isin(nxt, stop)
        if done.all():
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = model(idx=nxt[:, None], attn_mask=mask, cache=cache,
                       logits_at=torch.ones(B, 1, dtype=torch.bool, device=device))
    tokens = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    return [cut_at_stop(row, stop_ids) for row in tokens]


def cut_at_stop(ids, stop_ids):
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i]
    return ids
