"""
The BLIP-2 / InstructBLIP Querying Transformer (Q-Former), and the BERT pieces it is built from:
a BERT encoder (for MiniLM / bert-base-uncased) and `mean_pool`.

References: BLIP-2 (Li et al. 2023, sec. 3.1), InstructBLIP (Dai et al. 2023, sec. 2.3), BERT (Devlin et
al. 2019). The numerics mirror `transformers`' Blip2QFormerModel / InstructBlipQFormerModel / BertModel;
the module layout is ours: every Q-Former layer keeps its residual + LayerNorm steps itself and calls
two plain FFN submodules, `ffn_query` (query positions) and `ffn_text` (text positions), so that an
adapter (the MultiWay-Adapter) can wrap each modality's FFN.

Image features: BLIP-2 layer-norms the ViT output (vision_model.post_layernorm) BEFORE the Q-Former.
That is the vision side's job; `QFormer` takes already-normed `image_embeds`, exactly like
Blip2QFormerModel's `encoder_hidden_states`.
"""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from precision import sdpa
from weights.checkpoint import (CheckpointError, load_strict, read_config, read_state_dict,
                                remap, resolve_checkpoint, save_json, save_safetensors)

# ----------------------------------------------------------------------------- BERT encoder

@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # the exact (erf) GELU, as BERT's "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_hf(cls, hf: dict):
        return cls(**_config_fields(cls, hf))


def _config_fields(cls, hf: dict) -> dict:
    """The dataclass fields of `cls` found in a transformers config dict (absent -> our default)."""
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"unsupported BERT variant: hidden_act={hf.get('hidden_act')}, "
                              f"position_embedding_type={hf.get('position_embedding_type')}")
    return {f.name: hf[f.name] for f in fields(cls) if f.name in hf}


class Attention(nn.Module):
    """Multi-head attention, BERT naming (query/key/value) + the output projection `out`.
    Keys/values come from `context` (cross-attention) or from x itself (self-attention)."""

    def __init__(self, hidden, n_heads, context_size=None, dropout=0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_size or hidden, hidden)
        self.value = nn.Linear(context_size or hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, context=None, mask=None):  # x (B, T, H), context (B, S, E), mask (B, 1, 1, S) bool
        context = x if context is None else context
        B, T, H = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        y = sdpa(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, H))


class FFN(nn.Module):
    """The transformer feed-forward: returns only dense2(gelu(dense1(x))); residual and LayerNorm
    are the caller's (so an adapter can wrap this module and add its own delta)."""

    def __init__(self, hidden, intermediate):
        super().__init__()
        self.dense1 = nn.Linear(hidden, intermediate)
        self.dense2 = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.dense2(F.gelu(self.dense1(x)))


def _mask(attention_mask):  # (B, T) 1 = keep -> (B, 1, 1, T) bool, or None
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


class BertLayer(nn.Module):
    """A post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attn = Attention(c.hidden_size, c.num_attention_heads, dropout=c.attention_probs_dropout_prob)
        self.ln_attn = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ffn = FFN(c.hidden_size, c.intermediate_size)
        self.ln_ffn = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x, mask=None):  # (B, T, H)
        x = self.ln_attn(x + self.drop(self.attn(x, mask=mask)))
        return self.ln_ffn(x + self.drop(self.ffn(x)))


class BertModel(nn.Module):
    """BERT encoder (Devlin et al. 2019), numerically equal to transformers' BertModel's
    last_hidden_state. Token types are always 0; the pooler is not built."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = self.config = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.ln_embed = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids, attention_mask=None):  # (B, T) -> (B, T, H)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)  # (B, T, H)
        x = self.drop(self.ln_embed(x + self.token_type_embeddings.weight[0]))
        for layer in self.layers:
            x = layer(x, _mask(attention_mask))
        return x

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A BERT checkpoint: keys with or without the `bert.` prefix (bert-base-uncased has it, plus
        `cls.*` pretraining heads; MiniLM has none), old `LayerNorm.gamma/beta` names accepted.
        Returned in eval mode."""
        folder = resolve_checkpoint(name_or_path, ("*.json", "*.safetensors", "vocab.txt"))
        hf = read_config(folder)
        if hf.get("model_type") != "bert":
            raise CheckpointError(f"{folder}: model_type {hf.get('model_type')!r}, expected 'bert'")
        model = cls(BertConfig.from_hf(hf))
        state = {_modern_name(k): v for k, v in read_state_dict(folder).items()}
        prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
        load_strict(model, remap(state, _bert_mapping(model.config, prefix), ignore=_ignore_bert,
                                 source=str(folder)), source=str(folder))
        return model.eval()


def _modern_name(key):  # the 2018 port's LayerNorm names, still in bert-base-uncased's safetensors
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _ignore_bert(key):
    """Pooler and MLM/NSP heads are not part of the encoder; position/token-type id buffers are
    recomputed."""
    return key.startswith(("pooler.", "bert.pooler.", "cls.")) or key.endswith(
        ("embeddings.position_ids", "embeddings.token_type_ids"))


def _linear(ours, hub):  # our_key -> hub_key for a Linear or LayerNorm's weight and bias
    return {f"{ours}.{p}": f"{hub}.{p}" for p in ("weight", "bias")}


def _bert_mapping(c: BertConfig, p=""):
    m = {"word_embeddings.weight": f"{p}embeddings.word_embeddings.weight",
         "position_embeddings.weight": f"{p}embeddings.position_embeddings.weight",
         "token_type_embeddings.weight": f"{p}embeddings.token_type_embeddings.weight",
         **_linear("ln_embed", f"{p}embeddings.LayerNorm")}
    for i in range(c.num_hidden_layers):
        h = f"{p}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            m |= _linear(f"layers.{i}.attn.{name}", f"{h}attention.self.{name}")
        m |= _linear(f"layers.{i}.attn.out", f"{h}attention.output.dense")
        m |= _linear(f"layers.{i}.ln_attn", f"{h}attention.output.LayerNorm")
        m |= _linear(f"layers.{i}.ffn.dense1", f"{h}intermediate.dense")
        m |= _linear(f"layers.{i}.ffn.dense2", f"{h}output.dense")
        m |= _linear(f"layers.{i}.ln_ffn", f"{h}output.LayerNorm")
    return m


def mean_pool(hidden, mask):  # hidden (B, T, H), mask (B, T) -> (B, H): mean over unmasked tokens
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

# ----------------------------------------------------------------------------- Q-Former

@dataclass
class QFormerConfig:
    """Defaults are BLIP-2's (bert-base width, 32 queries, EVA ViT-g width 1408)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    num_query_tokens: int = 32
    cross_attention_freq: int = 2  # layers 0, f, 2f, ... cross-attend to the image
    encoder_hidden_size: int = 1408  # width of the image features (the ViT)
    use_text_input: bool = True  # text way present: word/position embeddings + ffn_text

    @classmethod
    def from_hf(cls, hf: dict):
        """From a Blip2Config / InstructBlipConfig dict (its `qformer_config` + `num_query_tokens`)."""
        q = dict(hf["qformer_config"])
        q["cross_attention_freq"] = q.get("cross_attention_frequency", 2)
        q["num_query_tokens"] = hf.get("num_query_tokens", 32)
        if "hidden_size" in hf.get("vision_config", {}):  # transformers overrides it the same way
            q["encoder_hidden_size"] = hf["vision_config"]["hidden_size"]
        q["use_text_input"] = hf["model_type"] == "instructblip" or q.get("use_qformer_text_input", False)
        return cls(**_config_fields(cls, q))

    def to_hf(self) -> dict:
        q = {k: v for k, v in asdict(self).items() if k not in ("num_query_tokens", "cross_attention_freq",
                                                                  "use_text_input")}
        return {"model_type": "blip-2", "num_query_tokens": self.num_query_tokens,
                "qformer_config": q | {"model_type": "blip_2_qformer", "pad_token_id": 0,
                                       "cross_attention_frequency": self.cross_attention_freq,
                                       "use_qformer_text_input": self.use_text_input}}


class QFormerLayer(nn.Module):
    """One Q-Former layer on [queries; text] (BLIP-2 Fig. 2): shared self-attention over all positions,
    then (query positions only) cross-attention to the image in every `cross_attention_freq`-th layer,
    then one FFN per way: `ffn_query` for the first `num_queries` positions, `ffn_text` for the rest.
    Each sublayer is post-LN with its own LayerNorm: x = LN(x + sublayer(x))."""

    def __init__(self, c: QFormerConfig, index: int):
        super().__init__()
        H, eps = c.hidden_size, c.layer_norm_eps
        self.attn = Attention(H, c.num_attention_heads, dropout=c.attention_probs_dropout_prob)
        self.ln_attn = nn.LayerNorm(H, eps=eps)
        self.cross_attn, self.ln_cross = None, None
        if index % c.cross_attention_freq == 0:
            self.cross_attn = Attention(H, c.num_attention_heads, c.encoder_hidden_size,
                                        dropout=c.attention_probs_dropout_prob)
            self.ln_cross = nn.LayerNorm(H, eps=eps)
        self.ffn_query, self.ln_ffn_query = FFN(H, c.intermediate_size), nn.LayerNorm(H, eps=eps)
        self.ffn_text, self.ln_ffn_text = None, None
        if c.use_text_input:
            self.ffn_text, self.ln_ffn_text = FFN(H, c.intermediate_size), nn.LayerNorm(H, eps=eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x, mask=None, image_embeds=None, num_queries=0):
        # x (B, Q+T, H), mask (B, 1, 1, Q+T) bool, image_embeds (B, S, E) -> (B, Q+T, H)
        x = self.ln_attn(x + self.drop(self.attn(x, mask=mask)))
        q, t = x[:, :num_queries], x[:, num_queries:]  # (B, Q, H), (B, T, H)
        if num_queries and self.cross_attn is not None:
            q = self.ln_cross(q + self.drop(self.cross_attn(q, context=image_embeds)))
        if num_queries:
            q = self.ln_ffn_query(q + self.drop(self.ffn_query(q)))
        if t.shape[1]:
            t = self.ln_ffn_text(t + self.drop(self.ffn_text(t)))
        return torch.cat([q, t], dim=1)


class QFormer(nn.Module):
    """The Q-Former of BLIP-2 / InstructBLIP. Input = LayerNorm([query_tokens; word + position
    embeddings of the instruction]); with no text, LayerNorm(query_tokens) (BLIP-2's `qformer.layernorm`,
    InstructBLIP's `qformer.embeddings.layernorm`: one LayerNorm either way).
    forward returns the query outputs (B, Q, H); with no image it is the plain BERT text encoder
    (text way only, no queries, no cross-attention), as BLIP-2 uses it for contrastive retrieval.
    `language_projection` (Linear(H, d_llm)) is loaded from BLIP-2 checkpoints for callers; it is
    None otherwise."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        c = self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_query_tokens, c.hidden_size))
        self.word_embeddings = self.position_embeddings = None
        if c.use_text_input:
            self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
            self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.ln_embed = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(QFormerLayer(c, i) for i in range(c.num_hidden_layers))
        self.language_projection = None
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=0.02)

    @staticmethod
    def _init_weights(m):  # BERT's init
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, image_embeds=None, input_ids=None, attention_mask=None):
        # image_embeds (B, S, E) already layer-normed; input_ids / attention_mask (B, T)
        if image_embeds is None and input_ids is None:
            raise ValueError("QFormer needs image_embeds, input_ids, or both")
        parts = []
        if image_embeds is not None:
            image_embeds = image_embeds.to(self.query_tokens.dtype)
            parts.append(self.query_tokens.expand(image_embeds.shape[0], -1, -1))  # (B, Q, H)
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former has no text way (a BLIP-2 checkpoint without "
                                 "use_qformer_text_input); it takes no input_ids")
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos))  # (B, T, H)
        x = self.drop(self.ln_embed(torch.cat(parts, dim=1)))  # (B, Q+T, H)
        Q = parts[0].shape[1] if image_embeds is not None else 0
        mask = None
        if attention_mask is not None:  # queries are always visible
            mask = _mask(F.pad(attention_mask, (Q, 0), value=1))  # (B, 1, 1, Q+T)
        for layer in self.layers:
            x = layer(x, mask, image_embeds, Q)
        return x[:, :Q] if Q else x

    def query_way_requires_grad_(self, requires_grad=True):
        """Set requires_grad on the query way only: the queries, every cross-attention and query
        FFN (with their LayerNorms). Shared self-attention and the text way are left as they are.
        Finds the layers through wrappers (e.g. an adapter around a layer)."""
        self.query_tokens.requires_grad_(requires_grad)
        for layer in (m for m in self.modules() if isinstance(m, QFormerLayer)):
            for part in (layer.cross_attn, layer.ln_cross, layer.ffn_query, layer.ln_ffn_query):
                if part is not None:
                    part.requires_grad_(requires_grad)
        return self

    @classmethod
    def from_pretrained(cls, name_or_path, encoder_hidden_size=None, num_query_tokens=None,
                        cross_attention_freq=None):
        """A BLIP-2 / InstructBLIP checkpoint (config.json model_type 'blip-2' / 'instructblip'),
        or a BERT checkpoint (model_type 'bert') as initialisation the BLIP-2 way; then
        encoder_hidden_size is required and num_query_tokens (default 32) / cross_attention_freq
        (default 2) set the new parts. For a BLIP checkpoint, any argument given must match it.
        Returned in eval mode (dropout off), like every loader here: call .train() to train."""
        folder = resolve_checkpoint(name_or_path)
        hf = read_config(folder)
        if hf.get("model_type") == "bert":
            if encoder_hidden_size is None:
                raise ValueError("initialising a Q-Former from BERT needs encoder_hidden_size (ViT width)")
            return cls._from_bert(folder, encoder_hidden_size, num_query_tokens or 32,
                                  cross_attention_freq or 2)
        if hf.get("model_type") not in ("blip-2", "instructblip"):
            raise CheckpointError(f"{folder}: model_type {hf.get('model_type')!r}; expected "
                                  "'blip-2', 'instructblip' or 'bert'")
        config = QFormerConfig.from_hf(hf)
        asked = dict(encoder_hidden_size=encoder_hidden_size, num_query_tokens=num_query_tokens,
                     cross_attention_freq=cross_attention_freq)
        for name, value in asked.items():
            if value not in (None, getattr(config, name)):
                raise CheckpointError(f"{folder}: {name} is {getattr(config, name)}, "
                                      f"caller asked for {value}")
        state = read_state_dict(folder)
        model = cls(config)
        if "language_projection.weight" in state:  # its output width is the LLM's: taken from the file
            d_llm = state["language_projection.weight"].shape[0]
            model.language_projection = nn.Linear(config.hidden_size, d_llm)
        mapping = _qformer_mapping(config, hf["model_type"], model.language_projection is not None)
        load_strict(model, remap(state, mapping, ignore=_ignore_blip, source=str(folder)), source=str(folder))
        return model.eval()

    @classmethod
    def _from_bert(cls, folder, encoder_hidden_size, num_query_tokens, cross_attention_freq):
        """BLIP-2's initialisation: embeddings, self-attention and text FFN from BERT, query FFN a
        copy of the text FFN, cross-attention and queries fresh. BERT's token-type-0 embedding is
        folded into the position embeddings (the Q-Former, like transformers' Blip2/InstructBlip
        ones, has no token-type table), so the text way equals the BERT encoder exactly."""
        bert = BertModel.from_pretrained(folder)
        shared = {f.name: getattr(bert.config, f.name) for f in fields(QFormerConfig)
                  if hasattr(bert.config, f.name)}
        config = QFormerConfig(**shared, num_query_tokens=num_query_tokens, use_text_input=True,
                               cross_attention_freq=cross_attention_freq,
                               encoder_hidden_size=encoder_hidden_size)
        model = cls(config)
        src = bert.state_dict()
        state = {"word_embeddings.weight": src["word_embeddings.weight"],
                 "position_embeddings.weight": src["position_embeddings.weight"]
                                               + src["token_type_embeddings.weight"][0],
                 "ln_embed.weight": src["ln_embed.weight"], "ln_embed.bias": src["ln_embed.bias"]}
        both_ways = {"ffn": ["ffn_text", "ffn_query"], "ln_ffn": ["ln_ffn_text", "ln_ffn_query"]}
        for k, v in src.items():
            if k.startswith("layers."):  # "layers.3.ffn.dense1.weight" -> "3", "ffn", "dense1.weight"
                i, sub, param = k.split(".", 3)[1:]
                targets = both_ways.get(sub, [sub])
                state |= {f"layers.{i}.{t}.{param}": v.clone() for t in targets}
        load_strict(model, state, source=str(folder), keys=state.keys())
        print(f"QFormer: initialised from BERT {folder}: self-attention, text FFN and embeddings from BERT; "
              f"query FFN copied from the text FFN; cross-attention fresh (encoder_hidden_size="
              f"{encoder_hidden_size}); {num_query_tokens} queries ~ N(0, 0.02)")
        return model.eval()

    def save_pretrained(self, folder):
        """config.json (model_type blip-2) + model.safetensors in the BLIP-2 key layout."""
        folder = Path(folder)
        mapping = _qformer_mapping(self.config, "blip-2", self.language_projection is not None)
        own = self.state_dict()
        save_safetensors({hub: own[ours] for ours, hub in mapping.items()}, folder / "model.safetensors",
                         metadata={"format": "pt"})
        save_json(self.config.to_hf(), folder / "config.json")


def _ignore_blip(key):
    """The vision tower and the LLM are loaded by their own modules; Blip2ForImageTextRetrieval's
    ITC/ITM heads are not part of the Q-Former; position-id buffers are recomputed."""
    return key.startswith(("vision_model.", "language_model.", "vision_projection.", "text_projection.",
                           "itm_head.")) or key.endswith("embeddings.position_ids")


def _qformer_mapping(c: QFormerConfig, layout: str, projection: bool) -> dict:
    """our_key -> hub key for transformers' Blip2* ('blip-2') or InstructBlip* ('instructblip')."""
    m = {"query_tokens": "query_tokens"}
    if layout == "instructblip":
        m |= _linear("ln_embed", "qformer.embeddings.layernorm")
        emb = "qformer.embeddings"
    else:
        m |= _linear("ln_embed", "qformer.layernorm")
        emb = "embeddings"  # Blip2TextEmbeddings sit beside the Q-Former, not inside it
    if c.use_text_input:
        m |= {"word_embeddings.weight": f"{emb}.word_embeddings.weight",
              "position_embeddings.weight": f"{emb}.position_embeddings.weight"}
    if projection:
        m |= _linear("language_projection", "language_projection")
    for i in range(c.num_hidden_layers):
        h, o = f"qformer.encoder.layer.{i}.", f"layers.{i}."
        blocks = [("attn", "ln_attn", "attention")]
        if i % c.cross_attention_freq == 0:
            blocks.append(("cross_attn", "ln_cross", "crossattention"))
        for ours, ln, hub in blocks:
            for name in ("query", "key", "value"):
                m |= _linear(f"{o}{ours}.{name}", f"{h}{hub}.attention.{name}")
            m |= _linear(f"{o}{ours}.out", f"{h}{hub}.output.dense")
            m |= _linear(f"{o}{ln}", f"{h}{hub}.output.LayerNorm")
        ways = [("query", "_query")] + ([("text", "")] if c.use_text_input else [])
        for way, suffix in ways:
            m |= _linear(f"{o}ffn_{way}.dense1", f"{h}intermediate{suffix}.dense")
            m |= _linear(f"{o}ffn_{way}.dense2", f"{h}output{suffix}.dense")
            m |= _linear(f"{o}ln_ffn_{way}", f"{h}output{suffix}.LayerNorm")
    return m
