"""
The multimodal model: a frozen vision tower, a connector, one of the three adapter designs, and
the frozen decoder LLM. The data flow, top to bottom:

    pixels (B, 3, H, W) --ViT (frozen)--> layer select_layer's patch features (B, Np, Dv)
      --Projector (pixel shuffle + Linear-GELU-Linear)--> image tokens (B, Ni, d)
    CROME: Q-Former(the ViT's last layer after its post_layernorm, as BLIP-2's ln_vision; the
           instruction) (B, Q, Hq) --Linear--> (B, Q, d)
           CROMEAdapter(image tokens, query tokens) -> visual = [image; query] (B, Ni+Q, d)
    IAA, MWA and the baselines (llava, full): visual = image tokens
    input_ids with an image_mask: the visual tokens are spliced in at the placeholder positions
    CROME, llava: frozen LLM;  full: the LLM trains;  IAA: the InnerAdaptor's multimodal
    workflow around the frozen layers;  MWA: frozen LLM whose blocks route image/text tokens
    to their adapters.
    loss: cross-entropy on the answer tokens only, with logits computed only there.

TRAINABLE says, per design and stage, which components train; everything else is frozen
(requires_grad=False, eval mode) and never written to a stage's checkpoint.

Built from backbones (hub ids or folders) by build_vlm, and back from a run directory by
load_run.
"""
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import (CROMEAdapter, CROMEConfig, IAAConfig, InnerAdaptor, MWAConfig,
                      add_mwa_to_llm)
from image_processor import ImageProcessor
from model import LLM, generate
from qformer import QFormer
from text.tokenizer import Tokenizer, load_tokenizer
from text.wordpiece import VOCAB_FILES, WordPieceTokenizer
from vit import ViT
from weights.checkpoint import (CheckpointError, load_strict, read_config, read_safetensors_file,
                                resolve_checkpoint)

DESIGNS = ("crome", "iaa", "mwa")
BASELINES = ("llava", "full")   # the connector alone; the connector and the whole LLM
ADAPTERS = DESIGNS + BASELINES
QFORMER_VOCAB_DIR = "qformer_tokenizer"   # InstructBLIP repos keep the Q-Former's vocabulary here

# Which components train, per design and stage (1 pretraining, 2 instruction tuning,
# 3 task fine-tuning). CROME's rows are the paper's Fig. 3; IAA and MWA follow the same
# spirit (ours): stage 1 aligns through the connector alone, LLaVA-style; stage 2 adds the
# design's own modules; stage 3 tunes the design's modules alone. The baselines: "llava" is
# LLaVA's architecture with the LLM frozen in every stage (what the adapters add to);
# "full" is LLaVA-1.5's recipe, the LLM unfrozen after stage 1 (the cost the adapters avoid).
TRAINABLE = {
    "crome": {1: ("projector", "qformer_proj", "adapter"),
              2: ("projector", "qformer", "qformer_proj", "adapter"),
              3: ("adapter",)},
    "iaa": {1: ("projector",), 2: ("projector", "adapter"), 3: ("adapter",)},
    "mwa": {1: ("projector",), 2: ("projector", "adapter"), 3: ("adapter",)},
    "llava": {1: ("projector",), 2: ("projector",), 3: ("projector",)},
    "full": {1: ("projector",), 2: ("projector", "llm"), 3: ("projector", "llm")},
}


def saved_components(design: str, stage: int) -> tuple:
    """A stage's checkpoint holds everything trained up to and including that stage, so each
    run directory is self-contained for evaluation and for the next stage."""
    return tuple(sorted({c for s in range(1, stage + 1) for c in TRAINABLE[design][s]}))


@dataclass
class VLMConfig:
    adapter: str = "crome"
    select_layer: int = -1      # ViT layer fed to the projector (LLaVA/IAA use -2 at scale); the
                                # Q-Former always reads the last layer after post_layernorm
    shuffle: int = 2            # pixel shuffle: s x s patches -> one token (1 = LLaVA's plain MLP)
    system_prompt: str = ""     # an explicit empty one: SmolLM2's template would add 18 tokens
    chat_format: str = "auto"   # text.tokenizer's format name; a run records the one it used
    max_instruction_len: int = 32   # Q-Former instruction tokens (CROME; InstructBLIP: 128)
    pad_to_square: bool | None = None   # LLaVA's expand2square; None = the preprocessor_config's
    crome: CROMEConfig = field(default_factory=CROMEConfig)
    iaa: IAAConfig = field(default_factory=IAAConfig)
    mwa: MWAConfig = field(default_factory=MWAConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        subs = {"crome": CROMEConfig, "iaa": IAAConfig, "mwa": MWAConfig}
        d = dict(d)
        for key, sub in subs.items():
            if isinstance(d.get(key), dict):
                d[key] = sub(**d[key])
        if isinstance(d["iaa"].insert_after, list):
            d["iaa"].insert_after = tuple(d["iaa"].insert_after)
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Projector(nn.Module):
    """LLaVA-1.5's connector, Linear -> GELU -> Linear (IAA uses the same), after an optional
    pixel shuffle (as in nanoVLM / Idefics3) that folds each s x s block of patches into one
    token, so Np patches of width Dv become Np/s^2 tokens of width Dv*s^2."""

    def __init__(self, vision_dim, llm_dim, shuffle=1):
        super().__init__()
        self.shuffle = shuffle
        self.fc1 = nn.Linear(vision_dim * shuffle * shuffle, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        B, N, D = x.shape                                   # (B, Np, Dv)
        s, g = self.shuffle, math.isqrt(N)
        if s > 1:
            x = x.view(B, g // s, s, g // s, s, D).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(B, (g // s) ** 2, s * s * D)      # (B, Np/s^2, Dv*s^2)
        return self.fc2(F.gelu(self.fc1(x)))                # (B, Ni, d)


class VLM(nn.Module):
    """Vision tower + connector + adapter design + frozen LLM. See the module docstring."""

    def __init__(self, cfg: VLMConfig, llm, vision, qformer=None):
        super().__init__()
        if cfg.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {cfg.adapter!r}: choose one of {', '.join(ADAPTERS)}")
        self.cfg = cfg
        d, dv = llm.config.n_embd, vision.config.hidden_size
        self.llm, self.vision = llm, vision
        self.projector = Projector(dv, d, cfg.shuffle)
        self.qformer = self.qformer_proj = self.adapter = None
        if cfg.adapter == "crome":
            if qformer is None:
                raise ValueError("CROME needs a Q-Former")
            if qformer.config.encoder_hidden_size != dv:
                raise ValueError(f"the vision tower's features are {dv} wide, but the Q-Former's "
                                 f"cross-attention reads {qformer.config.encoder_hidden_size}-wide "
                                 "ones (encoder_hidden_size): pair --qformer with the vision "
                                 "tower it was trained on, or initialise it from BERT")
            self.qformer = qformer
            self.qformer_proj = nn.Linear(qformer.config.hidden_size, d)
            self.adapter = CROMEAdapter(d, cfg.crome)
        elif cfg.adapter == "iaa":
            self.adapter = InnerAdaptor(llm, cfg.iaa)
        elif cfg.adapter == "mwa":
            self.adapter = add_mwa_to_llm(llm, cfg.mwa)
        grid = vision.config.image_size // vision.config.patch_size
        if grid % cfg.shuffle:
            raise ValueError(f"pixel shuffle {cfg.shuffle} does not divide the {grid}x{grid} patch "
                             "grid of the vision tower")
        self.n_image_tokens = (grid // cfg.shuffle) ** 2
        self.n_visual = self.n_image_tokens + (qformer.config.num_query_tokens if qformer else 0)
        self.stage = None

    # --------------------------------------------------------------- stages and freezing

    def set_stage(self, stage: int):
        """Freeze everything, then unfreeze this stage's components (TRAINABLE)."""
        self.stage = stage
        self.requires_grad_(False)
        for name in TRAINABLE[self.cfg.adapter][stage]:
            getattr(self, name).requires_grad_(True)
        return self.train(self.training)

    def train(self, mode=True):
        """Frozen components stay in eval mode (no dropout) whatever the mode."""
        super().train(mode)
        if self.stage is not None:
            trainable = TRAINABLE[self.cfg.adapter][self.stage]
            for name, module in self.named_children():
                if name not in trainable:
                    module.eval()
            if "adapter" in trainable and self.cfg.adapter == "mwa":
                self.adapter.train(mode)
        return self

    def trainable_state(self) -> dict:
        """Weights of saved_components(design, stage), keyed 'component.param'."""
        names = saved_components(self.cfg.adapter, self.stage)
        return {f"{n}.{k}": v for n in names for k, v in getattr(self, n).state_dict().items()}

    # --------------------------------------------------------------- forward

    def visual_tokens(self, pixels, instr_ids=None, instr_mask=None):
        """pixels (B, 3, H, W) -> the visual tokens spliced into the LLM input (B, Nv, d)."""
        crome = self.cfg.adapter == "crome"
        layers = (self.cfg.select_layer, -1) if crome else (self.cfg.select_layer,)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trains()):
            feats, *last = self.vision.hidden_states(pixels, layers)        # (B, Np(+1), Dv)
        patches = feats[:, 1:] if self.vision.config.class_token else feats  # (B, Np, Dv)
        image = self.projector(patches)                                      # (B, Ni, d)
        if not crome:
            return image
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.qformer_trains()):
            # BLIP-2's ln_vision(tower(image)): the last layer through the tower's own final
            # LayerNorm, all tokens, whatever layer the projector reads
            normed = self.vision.post_layernorm(last[0])                     # (B, Np(+1), Dv)
            queries = self.qformer(normed, instr_ids, instr_mask)            # (B, Q, Hq)
        image, text = self.adapter(image, self.qformer_proj(queries))
        return torch.cat([image, text], dim=1)                               # (B, Ni+Q, d)

    def prefix_is_frozen(self):
        """Whether text positions run through frozen weights alone: the LLM path of CROME and
        LLaVA, and of full fine-tuning while its LLM is frozen (not IAA's own embedding and
        layers, nor MWA's adapters, which sit inside the LLM's blocks)."""
        return self.cfg.adapter != "iaa" and not any(p.requires_grad for p in self.llm.parameters())

    def vision_trains(self):
        return any(p.requires_grad for p in self.vision.parameters())

    def qformer_trains(self):
        return any(p.requires_grad for p in self.qformer.parameters())

    def embed(self, batch):
        """Token embeddings with the visual tokens written at the image positions. "pixels"
        (Bi, 3, H, W) holds the image rows' alone, in order, so text-only rows (no image
        positions) are the LLM path alone; a batch without "pixels" has no image row."""
        table = self.adapter.embed if self.cfg.adapter == "iaa" else self.llm.wte
        x = table(batch["input_ids"])                                         # (B, T, d)
        if "pixels" not in batch:
            return x
        visual = self.visual_tokens(batch["pixels"], batch.get("instr_ids"),
                                    batch.get("instr_mask"))                  # (Bi, Nv, d)
        return x.masked_scatter(batch["image_mask"][..., None], visual.to(x.dtype))

    def run_llm(self, inputs_embeds=None, ways=None, idx=None, **kw):
        """The LLM call of this design (kw: attn_mask, cache, logits_at). ways: (B, T) with 1
        at image tokens, used by MWA; None means all text (decoding)."""
        if self.cfg.adapter == "iaa":
            return self.adapter(self.llm, idx=idx, inputs_embeds=inputs_embeds, **kw)
        return self.llm(idx=idx, inputs_embeds=inputs_embeds, ways=ways, **kw)

    def forward(self, batch):
        """Mean cross-entropy over the answer tokens (labels != -100). The rows' shared opening
        (batch["shared_prefix"] tokens, data.collate.shared_prefix) runs once, without
        gradient, where nothing trainable touches it: the same loss and gradients, fewer FLOPs."""
        x = self.embed(batch)                                                 # (B, T, d)
        labels, ways = batch["labels"], batch["image_mask"].long()
        at = torch.zeros_like(labels, dtype=torch.bool)
        at[:, :-1] = labels[:, 1:] != -100             # position t predicts token t+1
        targets = labels[:, 1:][labels[:, 1:] != -100]
        shared = batch.get("shared_prefix", 0) if self.prefix_is_frozen() else 0
        cache = self.llm.prefix_cache(batch["input_ids"][0, :shared]) if shared else None
        logits = self.run_llm(x[:, shared:], ways[:, shared:], logits_at=at[:, shared:],
                              cache=cache)                                    # (N, V)
        loss = F.cross_entropy(logits.float(), targets)
        if "pixels" not in batch and self.training:
            # Text-only rows never reach the visual modules. Every trainable weight joins the
            # graph times 0 (a zero gradient, as LLaVA's blank image for such rows gives), so
            # backward works where only visual modules train, and DDP reduces every weight.
            loss = loss + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        return loss

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=16, stop_ids=(), **sampling):
        """Answers (lists of token ids) for a left-padded prompt batch: input_ids, image_mask,
        attn_mask, pixels (and instr_ids, instr_mask for CROME). KV-cached decoding."""
        ways = batch["image_mask"].long()

        def step(idx=None, inputs_embeds=None, **kw):
            return self.run_llm(inputs_embeds, ways if idx is None else None, idx=idx, **kw)

        new_cache = (lambda b, n: self.adapter.new_cache(self.llm, b, n)) \
            if self.cfg.adapter == "iaa" else self.llm.new_cache
        return generate(step, new_cache, inputs_embeds=self.embed(batch),
                        attn_mask=batch.get("attn_mask"), max_new_tokens=max_new_tokens,
                        stop_ids=stop_ids, **sampling)


# ----------------------------------------------------------------------------- building and loading


@dataclass
class Parts:
    """A built multimodal model and what feeds it."""
    model: VLM
    tok: Tokenizer                        # the LLM's tokenizer
    wordpiece: WordPieceTokenizer | None  # the Q-Former's (CROME), else None
    processor: ImageProcessor


def build_vlm(vcfg: VLMConfig, llm: str, vision: str, qformer: str | None, bf16: bool,
              device, qformer_tokenizer: str | None = None) -> Parts:
    """Backbones from hub ids / folders, composed into a VLM (a Q-Former and its vocabulary,
    see qformer_wordpiece, only for CROME). The frozen LLM is stored in bf16 when training in
    bf16; every component that may train stays fp32 (autocast does the bf16 math)."""
    llm_model = LLM.from_pretrained(llm, dtype=torch.bfloat16 if bf16 else None)
    vision_model = ViT.from_pretrained(vision)
    qformer_model = None
    if vcfg.adapter == "crome":
        qformer_model = load_qformer(qformer, vision_model.config.hidden_size)
    vlm = trainable_in_fp32_(VLM(vcfg, llm_model, vision_model, qformer_model))
    processor_folder = resolve_checkpoint(vision, ("preprocessor_config.json",))
    processor = ImageProcessor.from_hf(read_config(processor_folder, "preprocessor_config.json"),
                                       pad_to_square=vcfg.pad_to_square)
    return Parts(vlm.to(device), load_tokenizer(llm, vcfg.chat_format),
                 instruction_wordpiece(qformer_model, qformer, qformer_tokenizer), processor)


def trainable_in_fp32_(vlm: VLM) -> VLM:
    """Every component that trains at some stage in fp32 (the Q-Former as loaded), whatever
    the LLM's dtype: with a bf16 LLM, autocast does the bf16 math and AdamW updates fp32."""
    for name in set(saved_components(vlm.cfg.adapter, 3)) - {"qformer"}:
        getattr(vlm, name).float()
    return vlm


def instruction_wordpiece(qformer_model, qformer: str, tokenizer: str | None):
    """The WordPiece tokenizer of the instruction CROME's Q-Former reads (InstructBLIP), or None
    where there is no Q-Former or it has no text way (a BLIP-2 generation checkpoint): its
    queries then do not read the instruction, as in BLIP-2 (ours: CROME's paper uses
    InstructBLIP's instruction-aware Q-Former)."""
    if qformer_model is None:
        return None
    if not qformer_model.config.use_text_input:
        if tokenizer:
            raise ValueError(f"--qformer-tokenizer {tokenizer}: the Q-Former {qformer} has no "
                             "text way, so it reads no instruction and needs no vocabulary")
        return None
    return qformer_wordpiece(qformer, tokenizer)


def load_qformer(source: str, vision_width: int) -> QFormer:
    """A BLIP-2 / InstructBLIP Q-Former as saved (VLM checks that it reads the vision tower's
    width), or a BERT checkpoint initialised the BLIP-2 way with cross-attention to
    vision_width-wide features. The fresh parts of a BERT initialisation are drawn from a fixed
    seed (ours), so load_run rebuilds the same Q-Former where a stage did not save it."""
    folder = resolve_checkpoint(source)
    if read_config(folder).get("model_type") != "bert":
        return QFormer.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return QFormer.from_pretrained(folder, encoder_hidden_size=vision_width)


def qformer_wordpiece(qformer: str, tokenizer: str | None = None) -> WordPieceTokenizer:
    """The Q-Former's WordPiece vocabulary: `tokenizer` (hub id or folder) when given, else the
    Q-Former folder's own, else its qformer_tokenizer/ subfolder (where InstructBLIP repos and
    InstructBlipProcessor.save_pretrained keep it). BLIP-2 repos hold none."""
    if tokenizer:
        return WordPieceTokenizer.from_pretrained(tokenizer)
    folder = resolve_checkpoint(qformer, VOCAB_FILES + tuple(f"{QFORMER_VOCAB_DIR}/{name}"
                                                             for name in VOCAB_FILES))
    for place in (folder, folder / QFORMER_VOCAB_DIR):
        found = WordPieceTokenizer.from_folder(place)
        if found is not None:
            return found
    raise CheckpointError(f"{qformer}: no Q-Former WordPiece vocabulary (vocab.txt or a WordPiece "
                          f"tokenizer.json, in the folder or its {QFORMER_VOCAB_DIR}/); BLIP-2 "
                          "repos carry none: pass --qformer-tokenizer google-bert/bert-base-uncased "
                          "(BLIP-2's vocabulary) or a folder holding one")


def load_components(model: VLM, state: dict, source: str) -> list[str]:
    """Load saved component weights ('component.param' keys) strictly; returns the names."""
    components = sorted({k.split(".", 1)[0] for k in state})
    keys = [f"{c}.{k}" for c in components for k in getattr(model, c).state_dict()]
    load_strict(model, state, source, keys=keys)
    return components


def load_run(run_dir, device="cpu", bf16=True) -> Parts:
    """A trained model back from its run directory (config.json + model.safetensors)."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir)
    if "vlm" not in saved:
        raise CheckpointError(f"{run_dir}: not a stage 1-3 run directory (config.json has no 'vlm')")
    parts = build_vlm(VLMConfig.from_dict(saved["vlm"]), **saved["backbones"], bf16=bf16,
                      device=device)
    load_components(parts.model, read_safetensors_file(run_dir / "model.safetensors"),
                    str(run_dir / "model.safetensors"))
    parts.model.set_stage(saved["train"]["stage"])
    parts.model.eval()
    return parts
