"""
The vision tower: a ViT (Dosovitskiy et al. 2021) covering the towers these adapters sit on,
CLIP's (Radford et al. 2021), SigLIP's (Zhai et al. 2023) and BLIP-2 / InstructBLIP's EVA ViT-g
(Li et al. 2023; Fang et al. 2023); their image preprocessing is in image_processor.py.

- CLIP: patch conv without bias, a class token, learned positions, a LayerNorm before the
  blocks (the hub's `pre_layrnorm`, sic), pre-norm blocks with QuickGELU, a final LayerNorm.
- SigLIP: patch conv with bias, no class token, no pre-LayerNorm, tanh-GELU. Its attention-
  pooling head (`head.*`) is not built: the adapters read patch tokens, never SigLIP's pooled output.
- BLIP (the vision tower of a BLIP-2 / InstructBLIP file, transformers' Blip2VisionModel /
  InstructBlipVisionModel): patch conv with bias, a class token, no pre-LayerNorm, exact GELU,
  biases on q and v only (LAVIS's q_bias, v_bias; the hub's fused qkv.bias holds zeros for k). A
  key bias adds the same q.b to every score of a query's row, which softmax ignores, so our fused
  bias is exact whatever its k third holds. The final LayerNorm is LAVIS's `ln_vision`: the
  Q-Former was trained on post_layernorm(hidden_states[-1]), all tokens (BLIP-2 already drops
  EVA's 40th block: the hub's tower has 39).

LLaVA and IAA feed the LLM the second-to-last layer with the class token dropped:
`vit(pixels, select_layer=-2, drop_cls=True)`. Layer indexing is transformers'
`hidden_states` (0 = embeddings, after the pre-LayerNorm for CLIP; -1 = last block, before the
final LayerNorm), and only the blocks up to the selected one run.

Ours: q/k/v are fused into one matmul (the loader concatenates the hub's three tensors and
save_pretrained splits them back), and attention goes through precision.sdpa (F.scaled_dot_product_attention).
Matches transformers' CLIPVisionModel / SiglipVisionModel (the tests allow 1e-4) and
Blip2VisionModel / InstructBlipVisionModel (1e-5) in fp32; on CPU here the outputs came out
bitwise equal.
"""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from precision import sdpa
from weights.checkpoint import (CheckpointError, load_strict, read_config, read_state_dict,
                                remap, resolve_checkpoint, save_json, save_safetensors)

# What each family's tower looks like; a ViTConfig field left None takes its family's value.
FAMILIES = {
    "clip": dict(layer_norm_eps=1e-5, hidden_act="quick_gelu", class_token=True, pre_norm=True,
                 patch_bias=False),
    "siglip": dict(layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", class_token=False,
                   pre_norm=False, patch_bias=True),
    "blip": dict(layer_norm_eps=1e-6, hidden_act="gelu", class_token=True, pre_norm=False,
                 patch_bias=True),
}
# transformers' config defaults for fields a hub config.json may leave out.
HUB_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32, num_channels=3),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224, patch_size=16, num_channels=3),
    "blip": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                 num_attention_heads=16, image_size=224, patch_size=14, num_channels=3),
}
MODEL_TYPES = {"clip_vision_model": "clip", "clip": "clip",
               "siglip_vision_model": "siglip", "siglip": "siglip",
               "blip_2_vision_model": "blip", "blip-2": "blip",
               "instructblip_vision_model": "blip", "instructblip": "blip"}
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
# Tensors of hub checkpoints that are not part of the vision tower; see ViT.from_pretrained.
SKIPPED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale",
                    "logit_bias")
# The other components of a Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration
# file (the Q-Former is qformer.py's to load, the LLM and its projection are not used here).
BLIP_SKIPPED_PREFIXES = ("qformer.", "query_tokens", "language_projection.", "language_model.")


@dataclass
class ViTConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    family: str = "clip"               # "clip", "siglip" or "blip": sets the defaults below
    layer_norm_eps: float | None = None
    hidden_act: str | None = None      # "quick_gelu" (CLIP), "gelu_pytorch_tanh" (SigLIP), "gelu"
    class_token: bool | None = None
    pre_norm: bool | None = None       # CLIP's pre_layrnorm
    patch_bias: bool | None = None     # CLIP's patch conv has no bias, SigLIP's has

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown ViT family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        for name, value in FAMILIES[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict) -> "ViTConfig":
        """A CLIPVisionConfig / SiglipVisionConfig / Blip2VisionConfig / InstructBlipVisionConfig
        dict, or a full CLIP / SigLIP / BLIP-2 / InstructBLIP (or LLaVA-style) config.json whose
        `vision_config` holds them. Fields it leaves out take transformers' defaults."""
        vision = hf.get("vision_config", hf)
        model_type = vision.get("model_type", hf.get("model_type"))
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"unsupported vision model_type {model_type!r}: "
                                  f"expected one of {', '.join(MODEL_TYPES)}")
        family = MODEL_TYPES[model_type]
        if family == "blip" and not vision.get("qkv_bias", True):
            raise CheckpointError("a BLIP vision tower without q/v biases (qkv_bias false) is not supported")
        values = {**HUB_DEFAULTS[family], **FAMILIES[family]}
        names = {f.name for f in fields(cls)} - {"family"}
        values.update({k: vision[k] for k in names if vision.get(k) is not None})
        return cls(family=family, **values)

    def to_hf(self) -> dict:
        """CLIPVisionConfig / SiglipVisionConfig style. class_token, pre_norm and patch_bias are
        written too (transformers ignores them and builds its family's layout). BLIP: a
        Blip2VisionConfig, for from_hf only (save_pretrained does not write BLIP towers)."""
        hf = {k: v for k, v in asdict(self).items() if k != "family"}
        if self.family == "blip":
            return {**hf, "model_type": "blip_2_vision_model", "qkv_bias": True}
        if self.family == "clip":
            return {**hf, "model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}
        return {**hf, "model_type": "siglip_vision_model", "architectures": ["SiglipVisionModel"],
                "vision_use_head": False}


class Attention(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):                                                  # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = sdpa(q, k, v)                                                  # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x = x + Attn(LN1(x)); x = x + MLP(LN2(x))."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = Attention(c)
        self.ln2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """CLIP / SigLIP / BLIP vision tower (see the module docstring). A fresh ViT(cfg) is initialised as
    OpenAI CLIP / transformers' CLIP _init_weights do; the project trains such a tower offline."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        D, n_pos = c.hidden_size, c.grid ** 2 + c.class_token
        self.patch_embed = nn.Conv2d(c.num_channels, D, c.patch_size, c.patch_size, bias=c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(D)) if c.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(n_pos, D))
        self.pre_layernorm = nn.LayerNorm(D, eps=c.layer_norm_eps) if c.pre_norm else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self):
        D, L = self.config.hidden_size, self.config.num_hidden_layers
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=D ** -0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=D ** -0.5 * (2 * L) ** -0.5)
            nn.init.normal_(block.attn.proj.weight, std=D ** -0.5)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * D) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=D ** -0.5 * (2 * L) ** -0.5)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid (N(+1), D): the learned ones, or (another
        image size) bicubically resized as transformers' interpolate_pos_encoding does."""
        n_cls, g = int(self.config.class_token), self.config.grid
        if (h, w) == (g, g):
            return self.pos_embed
        cls, grid = self.pos_embed[:n_cls], self.pos_embed[n_cls:]         # (1|0, D), (g*g, D)
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)                # (1, D, g, g)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.to(cls.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)   # (h*w, D)
        return torch.cat([cls, grid])

    def embed(self, pixel_values):
        """(B, C, H, W) -> hidden_states[0] (B, N(+1), D)."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)                                   # (B, h*w, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, 1, D), x], dim=1)      # (B, 1+h*w, D)
        x = x + self.positions(h, w)
        return self.pre_layernorm(x) if self.pre_layernorm is not None else x

    def forward(self, pixel_values, select_layer: int = -1, drop_cls: bool = False):
        """pixel_values (B, C, H, W) -> transformers' hidden_states[select_layer] (B, N, D); with
        drop_cls, the patch tokens only (a no-op for towers without a class token)."""
        x = self.hidden_states(pixel_values, (select_layer,))[0]
        return x[:, 1:] if drop_cls and self.config.class_token else x

    def hidden_states(self, pixel_values, layers: tuple) -> list:
        """pixel_values (B, C, H, W) -> [hidden_states[i] (B, N, D) for i in layers], from one
        pass that runs the blocks up to the deepest of them only."""
        n_states = self.config.num_hidden_layers + 1
        for i in layers:
            if not -n_states <= i < n_states:
                raise IndexError(f"select_layer {i} out of range for {n_states} hidden states")
        depths = [i % n_states for i in layers]
        x = self.embed(pixel_values)
        states = {0: x}
        for depth, block in enumerate(self.blocks[:max(depths)], start=1):
            x = block(x)
            if depth in depths:
                states[depth] = x
        return [states[d] for d in depths]

    def pooled(self, pixel_values):
        """CLIP's pooled image feature (B, D): post_layernorm of the last layer's class token,
        transformers' pooler_output (before visual_projection)."""
        if not self.config.class_token:
            raise ValueError("pooled() needs a class token; SigLIP pools with its attention head, "
                             "which this ViT does not build")
        return self.post_layernorm(self(pixel_values)[:, 0])

    # ------------------------------------------------------------- hub checkpoints

    def hub_names(self) -> dict:
        """our key -> hub key (CLIPVisionModel / SiglipVisionModel names, no prefix), or
        our key -> [q, k, v] hub keys for the fused attention input."""
        c = self.config
        names = {"patch_embed.weight": "embeddings.patch_embedding.weight",
                 "pos_embed": "embeddings.position_embedding.weight",
                 "post_layernorm.weight": "post_layernorm.weight",
                 "post_layernorm.bias": "post_layernorm.bias"}
        if c.patch_bias:
            names["patch_embed.bias"] = "embeddings.patch_embedding.bias"
        if c.class_token:
            names["cls_token"] = "embeddings.class_embedding"
        if c.pre_norm:
            names.update({f"pre_layernorm.{p}": f"pre_layrnorm.{p}" for p in ("weight", "bias")})
        for i in range(c.num_hidden_layers):
            ours, hub = f"blocks.{i}.", f"encoder.layers.{i}."
            for p in ("weight", "bias"):
                names[ours + f"attn.qkv.{p}"] = [hub + f"self_attn.{n}_proj.{p}" for n in "qkv"]
                for a, b in (("attn.proj", "self_attn.out_proj"), ("ln1", "layer_norm1"),
                             ("ln2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                    names[ours + f"{a}.{p}"] = hub + f"{b}.{p}"
        return names

    def blip_mapping(self, hub: dict, prefix: str) -> dict:
        """our key -> remap spec for a Blip2VisionModel / InstructBlipVisionModel: the fused qkv
        weight, its bias fused (transformers' files) or as LAVIS's q_bias and v_bias (a zero k
        third between them), the output `projection`, and class (1, 1, D) and position
        (1, N, D) embeddings, flattened to ours."""
        mapping = {"patch_embed.weight": prefix + "embeddings.patch_embedding.weight",
                   "patch_embed.bias": prefix + "embeddings.patch_embedding.bias",
                   "cls_token": (prefix + "embeddings.class_embedding", _flat),
                   "pos_embed": (prefix + "embeddings.position_embedding", _rows),
                   "post_layernorm.weight": prefix + "post_layernorm.weight",
                   "post_layernorm.bias": prefix + "post_layernorm.bias"}
        pairs = (("attn.proj", "self_attn.projection"), ("ln1", "layer_norm1"),
                 ("ln2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
        for i in range(self.config.num_hidden_layers):
            ours, theirs = f"blocks.{i}.", f"{prefix}encoder.layers.{i}."
            q_v = [theirs + "self_attn.q_bias", theirs + "self_attn.v_bias"]
            mapping[ours + "attn.qkv.weight"] = theirs + "self_attn.qkv.weight"
            mapping[ours + "attn.qkv.bias"] = (q_v, _qv_bias) if q_v[0] in hub else theirs + "self_attn.qkv.bias"
            mapping.update({ours + f"{a}.{p}": theirs + f"{b}.{p}" for a, b in pairs for p in ("weight", "bias")})
        return mapping

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None) -> "ViT":
        """A local folder or hub repo id holding config.json + safetensors, in any of:
        - CLIPVisionModel / SiglipVisionModel as transformers 5.x saves them (keys without prefix);
        - the same with the `vision_model.` prefix (hub files, older transformers);
        - a full CLIPModel / SiglipModel (vision tower under `vision_model.`);
        - a Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration (or its vision
          model alone): the EVA tower under `vision_model.`, see blip_mapping.
        Skipped by rule: the text tower and heads (`text_model.*`, `text_projection`,
        `visual_projection`, `logit_scale`, `logit_bias`), SigLIP's attention-pooling head
        (`head.*`), `position_ids` buffers, and in a BLIP-2 / InstructBLIP file the Q-Former, its
        queries, the LLM and its projection (`qformer.*`, `query_tokens`,
        `language_projection.*`, `language_model.*`). Any other extra, missing or misshaped
        tensor is a CheckpointError. Returned in eval mode."""
        folder = resolve_checkpoint(name_or_path)
        config = ViTConfig.from_hf(read_config(folder))
        hub = read_state_dict(folder)
        prefix = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in hub else ""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device or "cpu")

        def skipped(key):
            inner = key.removeprefix(prefix)
            if config.family == "blip":
                return key.startswith(BLIP_SKIPPED_PREFIXES)
            return (key.startswith(SKIPPED_PREFIXES) or inner == "embeddings.position_ids"
                    or (config.family == "siglip" and inner.startswith("head.")))

        if config.family == "blip":
            mapping = model.blip_mapping(hub, prefix)
        else:  # a list of hub keys is q, k, v -> one (3D, D) tensor
            mapping = {ours: ([prefix + k for k in hub_key], _cat) if isinstance(hub_key, list)
                       else prefix + hub_key for ours, hub_key in model.hub_names().items()}
        load_strict(model, remap(hub, mapping, ignore=skipped, source=str(folder)), source=str(folder))
        return model.to(dtype=dtype).eval()

    def save_pretrained(self, folder):
        """config.json + model.safetensors in the hub's CLIPVisionModel / SiglipVisionModel layout
        (`vision_model.` prefix, separate q/k/v), loadable by from_pretrained and transformers.
        BLIP towers are only loaded: they never train here."""
        if self.config.family == "blip":
            raise ValueError("save_pretrained writes CLIP / SigLIP towers; a BLIP tower is only loaded")
        state, hub = self.state_dict(), {}
        for ours, hub_key in self.hub_names().items():
            if isinstance(hub_key, list):
                hub.update(zip(hub_key, state[ours].chunk(3)))
            else:
                hub[hub_key] = state[ours]
        save_safetensors({"vision_model." + k: v for k, v in hub.items()},
                         Path(folder) / "model.safetensors", metadata={"format": "pt"})
        save_json(self.config.to_hf(), Path(folder) / "config.json")


def _cat(*tensors):
    return torch.cat(tensors)


def _qv_bias(q, v):
    """LAVIS's separate q and v biases -> the fused (3D,) bias, zeros for k."""
    return torch.cat([q, torch.zeros_like(q), v])


def _flat(t):
    return t.flatten()                                                    # (1, 1, D) -> (D,)


def _rows(t):
    return t.flatten(0, -2)                                               # (1, N, D) -> (N, D)
