"""
Named presets: every paper-scale knob of a design at once, `python train.py --preset NAME`.
A preset is a set of TrainConfig values, some for every stage and some for one stage only (a
paper's stages differ in learning rate, batch and length); each value names where it comes
from. Flags given on the command line override a preset's values (training.config.parse_args).

Sources: the papers' facts as /work/shared/PAPERS.md records them (section numbers below), and
LLaVA-1.5's released recipe (scripts/v1_5/pretrain.sh and finetune.sh) where a paper is silent;
"ours" marks our own choice. Batch sizes are per device, as in LLaVA-1.5's scripts, which ran
on 8 GPUs: on N GPUs pass --grad-accum 8/N for the same global batch. Step counts are one epoch
of LLaVA-1.5's data at that global batch; with other data, pass --steps.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Value:
    value: object
    source: str


@dataclass(frozen=True)
class Preset:
    summary: str
    image_tokens: Value                          # visual tokens per image (documentation, checks)
    every_stage: dict                            # TrainConfig field -> Value
    stages: dict = field(default_factory=dict)   # stage -> {field: Value}, that stage's own

    def values(self, stage: int) -> dict:
        """TrainConfig field -> value for a run of this stage."""
        chosen = self.every_stage | self.stages.get(stage, {})
        return {name: v.value for name, v in chosen.items()}

    def sources(self, stage: int) -> dict:
        chosen = self.every_stage | self.stages.get(stage, {})
        return {name: v.source for name, v in chosen.items()}


PRETRAIN = "LLaVA-1.5 pretrain.sh"
FINETUNE = "LLaVA-1.5 finetune.sh"
LLAVA = "LLaVA-1.5"
NO_STAGE3 = "ours: the paper gives no stage-3 values; stage 2's (pass --steps)"

# The LLaVA-1.5 front every preset shares: CLIP ViT-L/14 at 336 px, its second-to-last layer,
# one token per patch (576), images padded to square, 2048 tokens per example.
CLIP_L336 = "openai/clip-vit-large-patch14-336"
TOKENS_576 = Value(576, "336 px / 14 px patches = 24 x 24, class token dropped")


def llava_front(source: str) -> dict:
    return {"vision": Value(CLIP_L336, source),
            "select_layer": Value(-2, source),
            "pixel_shuffle": Value(1, source + " (Linear-GELU-Linear on every patch)"),
            "pad_to_square": Value(True, source + " (image_aspect_ratio pad; every stage: ours)"),
            "max_len": Value(2048, LLAVA + " model_max_length, image tokens included"),
            "weight_decay": Value(0.0, LLAVA), "warmup": Value(0.03, LLAVA)}


def llava_stages(silent: str, **stage2_extra) -> dict:
    """LLaVA-1.5's two stages: 1 epoch of LCS-558K (558,128 rows) at batch 256 and lr 1e-3,
    then 1 epoch of llava_v1_5_mix665k (665,298 rows) at batch 128 and lr 2e-5. `silent` names
    why these stand in; stage2_extra: more stage-2 learning rates (field -> value)."""
    stage2 = {"lr": Value(2e-5, f"{FINETUNE}{silent}"),
              "batch_size": Value(16, f"{FINETUNE}: 16 x 8 GPUs = 128{silent}"),
              "steps": Value(5197, f"one epoch of 665,298 rows at 128{silent}")}
    stage2 |= {name: Value(lr, f"{FINETUNE}'s lr{silent}") for name, lr in stage2_extra.items()}
    stage3 = {name: Value(v.value, NO_STAGE3) for name, v in stage2.items() if name != "steps"}
    return {1: {"lr": Value(1e-3, f"{PRETRAIN}{silent}"),
                "batch_size": Value(32, f"{PRETRAIN}: 32 x 8 GPUs = 256{silent}"),
                "steps": Value(2180, f"one epoch of 558,128 rows at 256{silent}")},
            2: stage2, 3: stage3}


VICUNA_FORMAT = Value("vicuna", "LLaVA's conv_vicuna_v1 (PAPERS.md 5)")
IAA_SILENT = " (IAA's schedule is not in PAPERS.md)"


def iaa(n_insert: int) -> Preset:
    return Preset(
        f"IAA-{n_insert}: insertion layers inside a frozen Llama-3-8B, LLaVA-1.5's front",
        TOKENS_576,
        {"adapter": Value("iaa", "PAPERS.md 2"),
         "iaa_layers": Value(n_insert, f"IAA-{n_insert} (PAPERS.md 2; placed by the pair rule, "
                                       "exactly the released IAA-14 at 32 layers)"),
         "iaa_init": Value("copy", "ours: the init is not published (PAPERS.md 2, 5)"),
         "llm": Value("meta-llama/Meta-Llama-3-8B-Instruct",
                      "Llama-3-8B (PAPERS.md 2); -Instruct is ours, for its chat format"),
         "chat_format": Value("llama3", "Llama-3-Instruct's template"),
         **llava_front("PAPERS.md 2 (IAA's code)")},
        llava_stages(IAA_SILENT, lr_adapter=2e-5))


PRESETS = {
    "crome-vicuna7b": Preset(
        "CROME on Vicuna-7B: CLIP-L/336 patches + a BERT-initialised instruction-aware Q-Former",
        Value(576 + 32, "576 patches + 32 Q-Former queries (PAPERS.md 4)"),
        {"adapter": Value("crome", "PAPERS.md 1"),
         "llm": Value("lmsys/vicuna-7b-v1.5", "Vicuna-7B (PAPERS.md 1); v1.5 is ours, LLaVA-1.5's"),
         "chat_format": VICUNA_FORMAT,
         **llava_front(LLAVA + "; CROME's tower is not in PAPERS.md"),
         "qformer": Value("google-bert/bert-base-uncased",
                          "ours: BLIP-2's initialisation (PAPERS.md 4), which reads any tower's "
                          "width; an InstructBLIP Q-Former reads EVA ViT-g features, which "
                          "vit.py cannot load yet (issue 12)"),
         "max_instruction_len": Value(128, "InstructBLIP (PAPERS.md 4, 5)")},
        llava_stages(" (CROME's schedule is not in PAPERS.md)", lr_qformer=2e-5, lr_adapter=2e-5)),
    "iaa14-llama3-8b": iaa(14),
    "iaa8-llama3-8b": iaa(8),
    "llava15-7b": Preset(
        "LLaVA-1.5-7B: the projector, then the whole Vicuna-7B (--adapter full)",
        TOKENS_576,
        {"adapter": Value("full", "LLaVA-1.5's recipe: projector, then projector + LLM"),
         "llm": Value("lmsys/vicuna-7b-v1.5", LLAVA), "chat_format": VICUNA_FORMAT,
         **llava_front(LLAVA)},
        llava_stages("", lr_llm=2e-5)),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def presets_help() -> str:
    """One line per preset, for train.py --help."""
    return "presets (--preset NAME; README's preset table gives every value's source):\n" + \
        "\n".join(f"  {name:17} {p.summary}" for name, p in PRESETS.items())
