"""
The contrastive image-text model, a second composition of the same components: a ViT and a
Q-Former whose query way reads the image and whose text way (BERT) reads the caption. It serves
stage 0 (BLIP-2 stage-1 ITC, to pretrain the offline vision tower and the Q-Former's query way)
and MWA's own paper setting (image-text retrieval with a frozen multiway encoder).

    pixels --ViT--> post-LN --Q-Former query way--> per-query projections (B, Q, E)
    caption ids --Q-Former text way--> pooled --> projection (B, E)
    similarity: the best query per pair; loss: symmetric contrastive
    matching (itm=True): [queries; statement] --Q-Former--> mean query output --Linear--> 2

Also here: the offline dual encoder's shape (a small CLIP-layout ViT, a Q-Former initialised
from MiniLM), and rebuilding a dual encoder from a stage-0 or retrieval run directory.
"""
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import MWAConfig, add_mwa_to_qformer
from image_processor import ImageProcessor
from qformer import QFormer, mean_pool
from text.wordpiece import WordPieceTokenizer
from vit import ViT, ViTConfig
from weights.checkpoint import CheckpointError, load_strict, read_config, read_safetensors_file
from weights.offline import minilm_folder

# The offline default: a small ViT trained from scratch on 64x64 images (8x8 patches), and
# BLIP-2's Q-Former initialised from MiniLM with 8 queries.
OFFLINE_VIT = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=6, image_size=64, patch_size=8)
OFFLINE_QUERIES = 8
CAPTION_TOKENS = 32     # WordPiece tokens per caption at most (easy-vqa's have about 5)


class DualEncoder(nn.Module):
    """Image-text contrastive model: BLIP-2's stage-1 ITC (Li et al. 2023, Sec. 3.2) and the
    MultiWay-Adapter's retrieval setting. Image side: ViT -> post-LN -> Q-Former query way ->
    per-query projections; text side: the Q-Former's text way (BERT) pooled -> projection.
    Similarity = max over queries of the cosine (BLIP-2); symmetric contrastive loss with a
    learnable temperature initialised to 1/0.07.
    Ours: (1) captions that repeat within a batch count as positives of each other (soft
    targets), since small caption sets repeat a lot; (2) text_pool="mean" pools the text way by
    its mask-aware mean instead of [CLS], for text ways trained as mean-pooled sentence
    encoders (MiniLM), whose [CLS] barely tells "a red circle" from "a red triangle";
    (3) clip_loss=True adds CLIP's loss on the ViT's class token, which gives a vision tower
    trained from scratch a direct gradient (through the Q-Former alone it learned colour but
    not shape in our runs).
    itm=True adds BLIP-2's image-text matching (ITM, Sec. 3.2): the queries and a statement
    share the Q-Former's bidirectional self-attention, and a linear head on the query outputs
    (BLIP-2 averages per-query logits; the mean of a linear map is the same) says whether the
    statement is true of the image. It is the only objective here that trains the
    query-instruction interaction CROME's instruction-aware Q-Former relies on; batches bring
    their statements (itm_ids, itm_mask, itm_labels)."""

    def __init__(self, vision, qformer, embed_dim=256, text_pool="cls", clip_loss=False,
                 itm=False):
        super().__init__()
        if text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be 'cls' or 'mean', got {text_pool!r}")
        if clip_loss and not vision.config.class_token:
            raise ValueError("clip_loss needs a vision tower with a class token")
        self.vision, self.qformer, self.text_pool = vision, qformer, text_pool
        h = qformer.config.hidden_size
        self.vision_proj = nn.Linear(h, embed_dim)
        self.text_proj = nn.Linear(h, embed_dim)
        self.cls_proj = nn.Linear(vision.config.hidden_size, embed_dim) if clip_loss else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm_head = nn.Linear(h, 2) if itm else None

    def image_features(self, pixels):
        """-> query features (B, Q, E), and class-token features (B, E) or None."""
        return self.hidden_features(self.vision_hidden(pixels))

    def vision_hidden(self, pixels):
        return self.vision.post_layernorm(self.vision(pixels, select_layer=-1))  # (B, N, Dv)

    def hidden_features(self, hidden):
        """image_features from the ViT's normed output hidden (B, N, Dv)."""
        queries = F.normalize(self.vision_proj(self.qformer(hidden)), dim=-1)     # (B, Q, E)
        return queries, self.class_features(hidden) if self.cls_proj else None

    def class_features(self, hidden):
        """The class token's features (B, E) from the ViT's normed output hidden (B, N, Dv)."""
        return F.normalize(self.cls_proj(hidden[:, 0]), dim=-1)

    def match_logits(self, hidden, ids, mask):
        """ITM: (is the statement true of the image?) logits (B, 2) for the ViT's normed
        output hidden (B, N, Dv) and statements ids, mask (B, T)."""
        return self.itm_head(self.qformer(hidden, ids, mask).mean(1))     # (B, Q, H) -> (B, 2)

    def text_pooled(self, ids, mask):
        hidden = self.qformer(None, ids, mask)                             # (B, T, H)
        return mean_pool(hidden, mask) if self.text_pool == "mean" else hidden[:, 0]

    def text_features(self, pooled):
        return F.normalize(self.text_proj(pooled), dim=-1)                 # (B, E)

    def similarity(self, query_feats, text_feats):
        """(Bi, Q, E) x (Bt, E) -> (Bi, Bt): best-matching query per pair."""
        return torch.einsum("iqe,te->itq", query_feats, text_feats).max(-1).values

    def forward(self, batch):
        """Contrastive loss of a batch: pixels (B, 3, H, W); caption_ids (B,), equal ids mark
        identical captions; the captions either as token ids text_ids, text_mask (B, T), encoded
        here through the text way, or as their pooled text-way output text_pooled (B, H), cached
        when the text way is frozen. With an ITM head, also the matching loss of the batch's
        statements itm_ids, itm_mask (B, T) and their truth itm_labels (B,). A batch that brings
        every caption instead (captions_pooled (C, H), caption_ids indexing them) gets the
        tower's loss alone (tower_loss)."""
        if "captions_pooled" in batch:
            return self.tower_loss(batch)
        hidden = self.vision_hidden(batch["pixels"])
        queries, cls = self.hidden_features(hidden)
        pooled = batch["text_pooled"] if "text_pooled" in batch else \
            self.text_pooled(batch["text_ids"], batch["text_mask"])
        text = self.text_features(pooled)                                   # (B, E)
        scale = self.logit_scale.exp().clamp(max=100)
        loss = contrastive_loss(scale * self.similarity(queries, text), batch["caption_ids"])
        if cls is not None:
            loss = loss + contrastive_loss(scale * cls @ text.t(), batch["caption_ids"])
        if self.itm_head is not None:
            logits = self.match_logits(hidden, batch["itm_ids"], batch["itm_mask"])
            loss = loss + F.cross_entropy(logits, batch["itm_labels"])
        return loss

    def tower_loss(self, batch):
        """The ViT alone (training.stages.tower_job): its class token's features scored against
        every caption's, cross-entropy on the image's own caption. CLIP's objective with the
        whole caption set as the texts; no Q-Former pass."""
        cls = self.class_features(self.vision_hidden(batch["pixels"]))          # (B, E)
        text = self.text_features(batch["captions_pooled"])                      # (C, E)
        scale = self.logit_scale.exp().clamp(max=100)
        return F.cross_entropy(scale * cls @ text.t(), batch["caption_ids"])


def contrastive_loss(logits, caption_ids):
    """Symmetric cross-entropy over a (B, B) image-text logit matrix, with soft targets that
    spread each row over the captions equal to its own."""
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(-1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


# ----------------------------------------------------------------------------- building and loading


def offline_dual_encoder(vit_config: ViTConfig, clip_loss: bool, itm: bool = False):
    """Stage 0's contrastive model: a fresh ViT and a Q-Former initialised from MiniLM (BLIP-2's
    way, OFFLINE_QUERIES queries), mean-pooled text. -> (model, image processor, WordPiece)."""
    qformer = QFormer.from_pretrained(minilm_folder(), encoder_hidden_size=vit_config.hidden_size,
                                      num_query_tokens=OFFLINE_QUERIES)
    model = DualEncoder(ViT(vit_config), qformer, text_pool="mean", clip_loss=clip_loss, itm=itm)
    return (model, ImageProcessor.clip(vit_config.image_size),
            WordPieceTokenizer.from_pretrained(minilm_folder()))


def vit_tokens(model: DualEncoder) -> int:
    """Tokens the ViT processes per image: patches and class token."""
    vit = model.vision.config
    return vit.grid ** 2 + vit.class_token


def image_tokens(model: DualEncoder) -> int:
    """Tokens the towers process per image: the ViT's, and the Q-Former's queries."""
    return vit_tokens(model) + model.qformer.config.num_query_tokens


def stage0_trainable_(model: DualEncoder) -> DualEncoder:
    """What stage 0 trains and saves: the ViT, the Q-Former's query way, the projections (the
    class token's too, when the model has one) and the temperature. The MiniLM text way stays
    frozen."""
    model.requires_grad_(False)
    for module in (model.vision, model.vision_proj, model.text_proj, model.cls_proj,
                   model.itm_head):
        if module is not None:
            module.requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    model.qformer.query_way_requires_grad_(True)
    return model


def tower_trainable_(model: DualEncoder) -> DualEncoder:
    """What the tower run trains and saves: the ViT, the class token's and the captions'
    projections and the temperature; the Q-Former (whose text way encodes the captions) stays
    frozen and unsaved."""
    model.requires_grad_(False)
    for module in (model.vision, model.cls_proj, model.text_proj):
        module.requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    return model


def trainable_keys(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def retrieval_model(stage0: Path, adapter: str | None, mwa: MWAConfig | None, device="cpu"):
    """Stage 0's dual encoder rebuilt as stage 0 built it and loaded strictly from its run
    directory, then set up for `adapter`: 'mwa' adds the MWA modules to the Q-Former and only
    they train, 'full' trains everything, None freezes everything (the zero-shot baseline).
    Built without the class-token and matching heads (stage 0's auxiliary CLIP and ITM losses,
    whose saved weights are left out here): retrieval ranks by the queries, the Q-Former's
    multiway output.
    -> (model, image processor, WordPiece tokenizer)."""
    vit_config = ViTConfig.from_hf(read_config(stage0)["vision"])
    model, processor, wordpiece = offline_dual_encoder(vit_config, clip_loss=False)
    weights = stage0 / "model.safetensors"
    state = {k: v for k, v in read_safetensors_file(weights).items()
             if not k.startswith(("cls_proj.", "itm_head."))}
    load_strict(model, state, str(weights), keys=trainable_keys(stage0_trainable_(model)))
    model.requires_grad_(adapter == "full")
    if adapter == "mwa":
        add_mwa_to_qformer(model.qformer, mwa).requires_grad_(True)
    return model.to(device), processor, wordpiece


def retrieval_config(stage0: Path, mwa: MWAConfig | None) -> dict:
    """What a retrieval run's config.json records to rebuild its model."""
    return {"init": str(stage0), "mwa": asdict(mwa) if mwa else None}


def load_retrieval_run(run_dir, device="cpu"):
    """A dual encoder back from a stage-0 run (as is: the frozen zero-shot baseline) or a
    retrieval run (its stage-0 init, then its trained weights), in eval mode. requires_grad
    marks what the run trained. -> (model, image processor, WordPiece tokenizer)."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir)
    if saved["train"].get("task", "vqa") == "retrieval":
        info = saved["retrieval"]
        mwa = MWAConfig(**info["mwa"]) if info["mwa"] else None
        model, processor, wordpiece = retrieval_model(Path(info["init"]), saved["train"]["adapter"],
                                                      mwa, device)
        weights = run_dir / "model.safetensors"
        load_strict(model, read_safetensors_file(weights), str(weights), keys=trainable_keys(model))
    elif saved["train"]["stage"] == 0:
        model, processor, wordpiece = retrieval_model(run_dir, None, None, device)
    else:
        raise CheckpointError(f"{run_dir}: not a stage-0 or retrieval run directory")
    return model.eval(), processor, wordpiece
