"""
The three adapter designs that give a frozen LLM vision. Each section maps code to its paper;
every detail a paper leaves open is a config field, and its docstring says it is ours.

- CROME (arXiv 2408.06610): a gated cross-modal adapter *before* the frozen LLM.
- IAA, Inner-Adaptor Architecture (arXiv 2408.12902): insertion layers *inside* the frozen LLM,
  with their own embedding layer, final norm and LM head; the text-only workflow is untouched.
- MWA, MultiWay-Adapter (arXiv 2309.01516): per-modality bottleneck adapters (New Knowledge
  Extractor) and a shared Alignment Enhancer in frozen multiway blocks.

`python -m tools.params` prints the parameter-count report at paper scale (built on the meta device,
no weights) and for the offline default.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import AttnContext, Block, KVCache, default_positions

# ----------------------------------------------------------------------------- CROME


@dataclass
class CROMEConfig:
    bottleneck: int = 195       # ours: 5*d*r = 5.0M parameters at Vicuna-13B width d = 5120
    glu: str = "sigmoid"        # ours: "sigmoid" (Dauphin et al. GLU) or "silu" (SwiGLU)
    residual: bool = True       # ours: x + up(GLU(x)); with up zero-initialised, starts as identity


class GatedDown(nn.Module):
    """Gated linear unit down-projection d -> r: (x W_v) * act(x W_g).  (CROME Fig. 2)"""

    def __init__(self, dim, bottleneck, glu):
        super().__init__()
        self.value = nn.Linear(dim, bottleneck, bias=False)
        self.gate = nn.Linear(dim, bottleneck, bias=False)
        self.act = torch.sigmoid if glu == "sigmoid" else F.silu

    def forward(self, x):
        return self.value(x) * self.act(self.gate(x))  # (B, N, r)


class CROMEAdapter(nn.Module):
    """CROME-Adapter (paper Fig. 2): the projected image features and the projected
    instruction-aware Q-Former features each go through their OWN gated down-projection, then
    through ONE up-projection whose weights both modalities share. The outputs are concatenated
    with the embedded question and fed to the frozen LLM (that part lives in vlm.py).
    Our reconstruction (config fields): GLU flavour, bottleneck width, the residual and the
    zero-initialised shared up-projection that makes the adapter start as the identity."""

    def __init__(self, dim, cfg: CROMEConfig):
        super().__init__()
        self.cfg = cfg
        self.down_image = GatedDown(dim, cfg.bottleneck, cfg.glu)
        self.down_text = GatedDown(dim, cfg.bottleneck, cfg.glu)
        self.up = nn.Linear(cfg.bottleneck, dim, bias=False)  # shared by both modalities
        nn.init.zeros_(self.up.weight)

    def forward(self, image_tokens, text_tokens):
        """image_tokens (B, N, d), text_tokens (B, Q, d) -> the same shapes, adapted."""
        image = self.up(self.down_image(image_tokens))
        text = self.up(self.down_text(text_tokens))
        if self.cfg.residual:
            image, text = image_tokens + image, text_tokens + text
        return image, text


# ----------------------------------------------------------------------------- IAA


@dataclass
class IAAConfig:
    n_insert: int = 8                  # IAA-8 / IAA-14 in the paper (pairs of layers)
    insert_after: tuple | None = None  # explicit frozen-layer indices; None = the pair rule
    init: str = "copy"                 # ours: "copy" (of the frozen layers) or "identity"


def iaa_insert_after(n_layer: int, n_insert: int) -> tuple:
    """The frozen layers after which IAA inserts a layer. The released IAA-14 on a 32-layer
    LLM uses {0,1,5,6,...,30,31}: pairs every 5 layers, the top pair last. Our rule for any
    depth and count: take pairs (i, i+1) at i = L-2, L-7, L-12, ... downwards until n_insert
    layers are chosen. For L = 32 it gives IAA-14 exactly, and IAA-8 = {15,16,...,30,31}."""
    if n_insert % 2 or n_insert < 2:
        raise ValueError(f"IAA inserts layers in pairs: n_insert={n_insert} must be even and >= 2")
    starts = list(range(n_layer - 2, -1, -5))
    if n_insert // 2 > len(starts):
        raise ValueError(f"at most {2 * len(starts)} insertion layers fit in {n_layer} layers")
    return tuple(sorted(i + d for i in starts[:n_insert // 2] for d in (0, 1)))


class InnerAdaptor(nn.Module):
    """IAA's multimodal workflow (paper Sec. 3, Fig. 2): its own embedding layer (MM-EL), a
    stack of insertion layers (full decoder layers) placed after chosen frozen layers, its own
    final norm and LM head (MM-LH). Forward, for each frozen layer i:
        h = Frozen_i(h);  if i in S: h = Insert_j(h)
    The insertion layer's output replaces h (only the residuals inside the layer remain).
    The text-only workflow never touches this module, so it is the base LLM exactly.
    Init (ours; the paper does not publish it): every part is copied from its frozen
    counterpart, so with init="copy" (the default) each insertion layer starts as its frozen
    layer applied once more. init="identity" then zeroes each insertion layer's two output
    projections (attention and MLP), so the layer starts as the identity and the untrained
    multimodal workflow computes the base LLM exactly, as zero-initialised adapters do.
    A tied base gets a tied MM-EL/MM-LH pair."""

    def __init__(self, llm, cfg: IAAConfig):
        super().__init__()
        n = llm.config.n_layer
        self.insert_after = tuple(cfg.insert_after or iaa_insert_after(n, cfg.n_insert))
        repeated = sorted({i for i in self.insert_after if self.insert_after.count(i) > 1})
        if repeated:
            raise ValueError(f"insert_after {self.insert_after} names frozen layer(s) {repeated} "
                             "more than once: one insertion layer per frozen layer")
        if not all(0 <= i < n for i in self.insert_after):
            raise ValueError(f"insert_after {self.insert_after} outside 0..{n - 1}")
        if cfg.init not in ("identity", "copy"):
            raise ValueError(f"IAA init must be 'identity' or 'copy', got {cfg.init!r}")
        self.embed = copy.deepcopy(llm.wte)
        self.layers = nn.ModuleList(copy.deepcopy(llm.blocks[i]) for i in self.insert_after)
        for j, layer in enumerate(self.layers):
            layer.attn.layer_idx = n + j  # its own KV-cache slot after the frozen layers'
            if cfg.init == "identity":
                for proj in (layer.attn.proj, layer.mlp.proj):  # x + 0 + 0: the identity
                    nn.init.zeros_(proj.weight)
                    if proj.bias is not None:
                        nn.init.zeros_(proj.bias)
        self.norm_f = copy.deepcopy(llm.norm_f)
        self.lm_head = nn.Linear(llm.config.n_embd, llm.config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight if llm.config.tie_word_embeddings else \
            nn.Parameter(llm.lm_head.weight.detach().clone())
        self.requires_grad_(True)

    def forward(self, llm, idx=None, inputs_embeds=None, positions=None, attn_mask=None,
                cache=None, logits_at=None):
        """Same call as LLM.forward, through the multimodal workflow."""
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if positions is None:
            positions = default_positions(x, attn_mask, cache)
        x, ctx = llm.context(x, positions, attn_mask, cache)
        inserted = dict(zip(self.insert_after, self.layers))
        for i, block in enumerate(llm.blocks):
            x = block(x, ctx)
            if i in inserted:
                x = inserted[i](x, ctx)
        if cache is not None:
            cache.pos += x.shape[1]
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.norm_f(x))

    def new_cache(self, llm, batch, max_len):
        """One KV cache covering both stacks, each slot in its own stack's dtype: the frozen
        layers' (slots 0..L-1) in the LLM's (e.g. bf16), the insertion layers' after them in
        the adaptor's (fp32 when it trains in fp32)."""
        cfg, ref = llm.config, self.embed.weight
        cache = llm.new_cache(batch, max_len)
        inserted = KVCache(len(self.layers), batch, cfg.n_kv_head, max_len, cfg.head_dim,
                           ref.dtype, ref.device)
        cache.k += inserted.k
        cache.v += inserted.v
        return cache


# ----------------------------------------------------------------------------- MWA


@dataclass
class MWAConfig:
    bottleneck: int = 64        # paper: 64
    scale: float = 0.5          # paper: s in 0.1-1.0
    dropout: float = 0.1
    ae_layers: str = "last2"    # ours: "all", "none", or "lastK"; see the PAPERS note on size
    ae_ratio: float = 1.0       # ours: AE width = ae_ratio * d (the paper's code uses 4)
    ways: int = 2               # modalities: 0 = text, 1 = image (decoder); 0 = text, 1 = query


def ae_layer_ids(n_layer: int, spec: str) -> set:
    if spec == "all":
        return set(range(n_layer))
    if spec == "none":
        return set()
    if spec.startswith("last") and spec[4:].isdigit():
        return set(range(max(0, n_layer - int(spec[4:])), n_layer))
    raise ValueError(f"ae_layers must be 'all', 'none' or 'lastK', got {spec!r}")


class BottleneckAdapter(nn.Module):
    """New Knowledge Extractor, one per modality (MWA Sec. 2.1):
    a = s * W_up(Dropout(ReLU(W_down x))), with W_up and its bias zero-initialised."""

    def __init__(self, dim, cfg: MWAConfig):
        super().__init__()
        self.down = nn.Linear(dim, cfg.bottleneck)
        self.up = nn.Linear(cfg.bottleneck, dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.scale * self.up(self.dropout(F.relu(self.down(x))))


class AlignmentEnhancer(nn.Module):
    """Alignment Enhancer, shared by all modalities (MWA Sec. 2.2): after the block,
    x3 = x2 + FFN_AE(x2), FFN_AE = Linear(d, w) -> GELU -> LayerNorm(w) -> Linear(w, d).
    Ours: width w = ae_ratio * d, and a zero-initialised output so the block starts unchanged."""

    def __init__(self, dim, cfg: MWAConfig):
        super().__init__()
        width = int(cfg.ae_ratio * dim)
        self.fc = nn.Linear(dim, width)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return x + self.proj(self.norm(F.gelu(self.fc(x))))


class WithAdapter(nn.Module):
    """A frozen FFN with a bottleneck adapter in parallel: ffn(x) + adapter(x). Used on the
    Q-Former, whose FFN modules return only their delta (the layer adds residual + LN)."""

    def __init__(self, ffn, adapter):
        super().__init__()
        self.ffn, self.adapter = ffn, adapter

    def forward(self, x):
        return self.ffn(x) + self.adapter(x)


class WithEnhancer(nn.Module):
    """A frozen layer followed by the Alignment Enhancer: AE(layer(...))."""

    def __init__(self, layer, enhancer):
        super().__init__()
        self.layer, self.enhancer = layer, enhancer

    def forward(self, *args, **kwargs):
        return self.enhancer(self.layer(*args, **kwargs))


def add_mwa_to_qformer(qformer, cfg: MWAConfig) -> nn.ModuleList:
    """The paper's setting on a multiway encoder: the Q-Former's query way and text way share
    self-attention and own their FFNs, so each way gets its adapter beside its FFN, and chosen
    layers get the shared AE. Modifies qformer in place; returns the new (trainable) modules."""
    dim = qformer.config.hidden_size
    new = nn.ModuleList()
    ae_ids = ae_layer_ids(len(qformer.layers), cfg.ae_layers)
    for i, layer in enumerate(qformer.layers):
        for way in ("ffn_query", "ffn_text"):
            if getattr(layer, way) is None:  # hub BLIP-2 files may have no text way
                continue
            adapter = BottleneckAdapter(dim, cfg)
            setattr(layer, way, WithAdapter(getattr(layer, way), adapter))
            new.append(adapter)
        if i in ae_ids:
            enhancer = AlignmentEnhancer(dim, cfg)
            qformer.layers[i] = WithEnhancer(layer, enhancer)
            new.append(enhancer)
    return new


class MWABlock(nn.Module):
    """A frozen decoder block made multiway by routing each token by its modality (ctx.ways):
        x1 = x + Attn(LN1(x));  x2 = x1 + FFN(LN2(x1)) + NKE_way(x1);  x3 = AE(x2)
    The decoder's FFN is shared by both modalities (a decoder LLM is not multiway); the
    per-modality part is the NKE adapter, as in the paper's eq. for x2. Ours: applying MWA
    inside a decoder LLM at all, so that `--adapter mwa` also serves the generative stages."""

    def __init__(self, block: Block, cfg: MWAConfig, with_enhancer: bool):
        super().__init__()
        dim = block.norm_1.weight.shape[0]
        self.block = block
        self.adapters = nn.ModuleList(BottleneckAdapter(dim, cfg) for _ in range(cfg.ways))
        self.enhancer = AlignmentEnhancer(dim, cfg) if with_enhancer else None

    def forward(self, x, ctx: AttnContext):
        b = self.block
        x = x + b.attn(b.norm_1(x), ctx)                                      # x1
        ways = ctx.ways if ctx.ways is not None else x.new_zeros(x.shape[:2], dtype=torch.long)
        extra = sum(torch.where((ways == w)[..., None], adapter(x), 0.0)
                    for w, adapter in enumerate(self.adapters))               # (B, T, C)
        x = x + b.mlp(b.norm_2(x)) + extra                                    # x2
        return self.enhancer(x) if self.enhancer is not None else x          # x3


def add_mwa_to_llm(llm, cfg: MWAConfig) -> nn.ModuleList:
    """Wrap every frozen decoder block of llm in an MWABlock (in place); returns the wrappers'
    new modules (adapters + enhancers) as one ModuleList for the optimizer and checkpoints."""
    ae_ids = ae_layer_ids(len(llm.blocks), cfg.ae_layers)
    new = nn.ModuleList()
    for i, block in enumerate(llm.blocks):
        wrapped = MWABlock(block, cfg, with_enhancer=i in ae_ids)
        llm.blocks[i] = wrapped
        new.append(nn.ModuleDict({"adapters": wrapped.adapters,
                                  **({"enhancer": wrapped.enhancer} if wrapped.enhancer else {})}))
    return new
