"""Tiny backbones written to folders in the hub layouts, and small slices of easy-vqa, so tests
can run train.py end to end in seconds.

    llm = write_llm(tmp / "llm")              # LlamaForCausalLM (transformers) + SmolLM2's tokenizer
    vision = write_vision(tmp / "vision")     # CLIP-layout ViT + preprocessor_config.json
    qformer = write_qformer(tmp / "qformer")  # BLIP-2-layout Q-Former + MiniLM's vocab.txt
    write_instructblip(tmp / "ib")            # the hub's layouts, written by transformers: InstructBLIP
    write_blip2(tmp / "b2", text_way=False)   #   (+ qformer_tokenizer/, preprocessor_config.json; its
    write_bert(tmp / "bert")                  #   vision tower loads as --vision), BLIP-2 (no Q-Former
                                              #   vocabulary), BERT (+ vocab.txt)
    files = easyvqa_slices(tmp / "data", n=48)  # {"captions_train": path, ..., "image_root": root}

The LLM keeps SmolLM2's vocabulary (49152) so the real tokenizer works on it. It has 17 layers
because IAA's default (IAAConfig.n_insert = 8 insertion layers, in pairs 5 layers apart) needs
at least 17; every other size is as small as the code allows.
"""
import json
import shutil
from pathlib import Path

import torch

from weights.checkpoint import save_json
from weights.offline import minilm_folder, smollm2_folder
from data.easyvqa import prepare_easyvqa
from qformer import QFormer, QFormerConfig
from training.config import parse_args, resolve
from training.runtime import Env
from training.stages import build_job
from image_processor import ImageProcessor
from vit import ViT, ViTConfig

LLM_LAYERS = 17
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           image_size=32, patch_size=8)   # 16 patches -> 4 image tokens after the 2x2 shuffle
QFORMER = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, num_query_tokens=4,
               encoder_hidden_size=VIT["hidden_size"])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_llm(folder, seed=0, layers=LLM_LAYERS) -> Path:
    """A random Llama with SmolLM2's vocabulary, saved by transformers, plus SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = Path(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_folder() / name, folder / name)
    return folder


def write_vision(folder, seed=0) -> Path:
    """A random CLIP-layout ViT and its CLIP preprocessing, as a vision-tower hub folder."""
    folder = Path(folder)
    torch.manual_seed(seed)
    ViT(ViTConfig(**VIT)).save_pretrained(folder)
    save_json(ImageProcessor.clip(VIT["image_size"]).to_hf(), folder / "preprocessor_config.json")
    return folder


def write_qformer(folder, seed=0) -> Path:
    """A random BLIP-2-layout Q-Former with MiniLM's (bert-base-uncased) WordPiece vocabulary."""
    folder = Path(folder)
    torch.manual_seed(seed)
    QFormer(QFormerConfig(**QFORMER)).save_pretrained(folder)
    shutil.copy(minilm_folder() / "vocab.txt", folder / "vocab.txt")
    return folder


# The hub's Q-Former layouts, written by transformers, at the tiny ViT's width (or another).
HUB_QFORMER = dict(vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=64, num_hidden_layers=2)
HUB_VISION = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=16)
OPT = dict(model_type="opt", vocab_size=120, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
           num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64,
           bos_token_id=2, eos_token_id=2, pad_token_id=1)


def write_instructblip(folder, vision_width=VIT["hidden_size"], seed=0) -> Path:
    """A random InstructBlipForConditionalGeneration and its InstructBlipProcessor, both saved by
    transformers as on the hub: the Q-Former's BERT vocabulary (MiniLM's, = bert-base-uncased's)
    lands in qformer_tokenizer/, the folder's own tokenizer is the LLM's (SmolLM2's here)."""
    from transformers import (AutoTokenizer, BertTokenizer, BlipImageProcessor,
                              InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor)
    folder = Path(folder)
    torch.manual_seed(seed)
    config = InstructBlipConfig(vision_config=dict(HUB_VISION, hidden_size=vision_width),
                                text_config=OPT, qformer_config=HUB_QFORMER, num_query_tokens=4)
    model = InstructBlipForConditionalGeneration(config)
    randomize(model.vision_model)
    model.save_pretrained(folder)
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(folder)   # preprocessor_config.json, as hub repos have it
    InstructBlipProcessor(image_processor=processor,
                          tokenizer=AutoTokenizer.from_pretrained(str(smollm2_folder())),
                          qformer_tokenizer=BertTokenizer(str(minilm_folder() / "vocab.txt")),
                          num_query_tokens=4).save_pretrained(folder)
    return folder


def write_blip2(folder, text_way: bool, seed=0) -> Path:
    """A random BLIP-2 as on the hub, without any Q-Former vocabulary (BLIP-2 repos carry none):
    text_way=False is Blip2ForConditionalGeneration (the Q-Former reads no text); True is
    Blip2ForImageTextRetrieval, whose Q-Former has the text way an instruction needs."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
    folder = Path(folder)
    torch.manual_seed(seed)
    config = Blip2Config(vision_config=dict(HUB_VISION, hidden_size=VIT["hidden_size"]),
                         text_config=OPT, num_query_tokens=4,
                         qformer_config=dict(HUB_QFORMER, use_qformer_text_input=text_way))
    model = (Blip2ForImageTextRetrieval if text_way else Blip2ForConditionalGeneration)(config)
    randomize(model.vision_model)
    model.save_pretrained(folder)
    return folder


def randomize(module, std=0.2):
    """Every weight drawn anew (transformers initialises biases to zero, LayerNorms to 1 and
    BLIP's embeddings at std 1e-10, where a misplaced tensor would go unseen), except the key
    third of BLIP's fused qkv bias, which stays zero as in the hub's files."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, std)
            if name.endswith("self_attn.qkv.bias"):
                p.view(3, -1)[1] = 0


def write_bert(folder, seed=0) -> Path:
    """A random BertModel as on the hub, with MiniLM's (bert-base-uncased's) vocab.txt: what
    BLIP-2 initialises its Q-Former from."""
    from transformers import BertConfig, BertModel
    folder = Path(folder)
    torch.manual_seed(seed)
    BertModel(BertConfig(**HUB_QFORMER)).save_pretrained(folder)
    shutil.copy(minilm_folder() / "vocab.txt", folder / "vocab.txt")
    return folder


def write_backbones(folder) -> dict[str, Path]:
    folder = Path(folder)
    return {"llm": write_llm(folder / "llm"), "vision": write_vision(folder / "vision"),
            "qformer": write_qformer(folder / "qformer")}


def easyvqa_slices(folder, n=48) -> dict[str, Path]:
    """The first n rows of each easy-vqa conversation file (converted into folder/full), written
    as folder/<kind>_<split>.json; image paths stay relative to the package's image root."""
    folder = Path(folder)
    full = prepare_easyvqa(folder / "full")
    out = {"image_root": full["image_root"]}
    for key, path in full.items():
        if key != "image_root":
            out[key] = folder / path.name
            save_json(json.loads(path.read_text())[:n], out[key])
    return out


def job_for(argv):
    """The resolved config, Env and Job that train.main builds for argv (without training
    stage 0 first) -> (cfg, env, job)."""
    cfg = resolve(parse_args(argv))
    env = Env(cfg)
    torch.manual_seed(cfg.seed)
    return cfg, env, build_job(cfg, env)
