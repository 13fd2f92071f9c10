"""Tiny backbones written to folders in the hub layouts, and small slices of easy-vqa, so tests
can run train.py end to end in seconds.

    llm = write_llm(tmp / "llm")              # LlamaForCausalLM (transformers) + SmolLM2's tokenizer
    vision = write_vision(tmp / "vision")     # CLIP-layout ViT + preprocessor_config.json
    qformer = write_qformer(tmp / "qformer")  # BLIP-2-layout Q-Former + MiniLM's vocab.txt
    write_instructblip(tmp / "ib")            # the hub's layouts, written by transformers: InstructBLIP
    write_blip2(tmp / "b2", text_way=False)   #   (+ qformer_tokenizer/, preprocessor_config.json; its
    write_bert(tmp / "bert")                  #   vision tower loads as --vision), BLIP-2 (no Q-Former
                                              #   vocabulary), BERT (+ vocab.txt)
    write_clip(tmp / "clip")                  # more hub layouts, written by transformers: a full
    write_siglip(tmp / "siglip")              #   CLIPModel, a full SiglipModel (+ their processors),
    write_qwen2(tmp / "qwen2")                #   Qwen2 and Llama-2 with tiny tokenizers of their kinds
    write_llama2(tmp / "llama2")              #   (byte-level BPE, SentencePiece-style BPE)
    files = easyvqa_slices(tmp / "data", n=48)  # {"captions_train": path, ..., "image_root": root}

The LLM keeps SmolLM2's vocabulary (49152) so the real tokenizer works on it. Every LLM here has
17 layers because IAA's default (IAAConfig.n_insert = 8 insertion layers, in pairs 5 layers
apart) needs at least 17; every other size is as small as the code allows, except where a
writer takes the patch grid of the repo it stands in for (image_size / patch_size).
"""
import json
import random
import shutil
from pathlib import Path

import torch

from weights.checkpoint import save_json
from weights.offline import minilm_folder, smollm2_folder
from data.easyvqa import prepare_easyvqa
from qformer import QFormer, QFormerConfig
from training.config import parse_args, resolve
from training.runtime import Env
from train import seeded_job
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


def write_instructblip(folder, vision_width=VIT["hidden_size"], seed=0, image_size=32,
                       patch_size=16) -> Path:
    """A random InstructBlipForConditionalGeneration and its InstructBlipProcessor, both saved by
    transformers as on the hub: the Q-Former's BERT vocabulary (MiniLM's, = bert-base-uncased's)
    lands in qformer_tokenizer/, the folder's own tokenizer is the LLM's (SmolLM2's here)."""
    from transformers import (AutoTokenizer, BertTokenizer, BlipImageProcessor,
                              InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor)
    folder = Path(folder)
    torch.manual_seed(seed)
    vision = dict(HUB_VISION, hidden_size=vision_width, image_size=image_size, patch_size=patch_size)
    config = InstructBlipConfig(vision_config=vision, text_config=OPT, qformer_config=HUB_QFORMER,
                                num_query_tokens=4)
    model = InstructBlipForConditionalGeneration(config)
    randomize(model.vision_model)
    model.save_pretrained(folder)
    processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor.save_pretrained(folder)   # preprocessor_config.json, as hub repos have it
    InstructBlipProcessor(image_processor=processor,
                          tokenizer=AutoTokenizer.from_pretrained(str(smollm2_folder())),
                          qformer_tokenizer=BertTokenizer(str(minilm_folder() / "vocab.txt")),
                          num_query_tokens=4).save_pretrained(folder)
    return folder


def write_blip2(folder, text_way: bool, seed=0, image_size=32, patch_size=16,
                vision_width=VIT["hidden_size"]) -> Path:
    """A random BLIP-2 as on the hub, without any Q-Former vocabulary (BLIP-2 repos carry none):
    text_way=False is Blip2ForConditionalGeneration (the Q-Former reads no text) with its
    Blip2Processor (preprocessor_config.json; the LLM's tokenizer is SmolLM2's here); True is
    Blip2ForImageTextRetrieval, whose Q-Former has the text way an instruction needs."""
    from transformers import (AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration,
                              Blip2ForImageTextRetrieval, Blip2Processor, BlipImageProcessor)
    folder = Path(folder)
    torch.manual_seed(seed)
    vision = dict(HUB_VISION, hidden_size=vision_width, image_size=image_size,
                  patch_size=patch_size)
    config = Blip2Config(vision_config=vision, text_config=OPT, num_query_tokens=4,
                         qformer_config=dict(HUB_QFORMER, use_qformer_text_input=text_way))
    model = (Blip2ForImageTextRetrieval if text_way else Blip2ForConditionalGeneration)(config)
    randomize(model.vision_model)
    model.save_pretrained(folder)
    if not text_way:
        processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
        processor.save_pretrained(folder)   # preprocessor_config.json, as hub repos have it
        Blip2Processor(image_processor=processor, num_query_tokens=4,
                       tokenizer=AutoTokenizer.from_pretrained(str(smollm2_folder()))
                       ).save_pretrained(folder)
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


# ----------------------------------------------------------------------------- more hub layouts

TEXT_TOWER = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, max_position_embeddings=16)


def write_clip(folder, image_size=32, patch_size=8, seed=0) -> Path:
    """A random full CLIPModel (vision and text towers, projections, logit scale), as
    openai/clip-vit-* repos hold it, and its CLIPImageProcessor, both saved by transformers."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    folder = Path(folder)
    torch.manual_seed(seed)
    vision = dict(VIT, image_size=image_size, patch_size=patch_size)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT_TOWER, projection_dim=16))
    randomize(model.vision_model, std=0.05)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def write_siglip(folder, image_size=32, patch_size=8, seed=0) -> Path:
    """A random full SiglipModel, as google/siglip-* repos hold it, and its
    SiglipImageProcessor, both saved by transformers."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel
    folder = Path(folder)
    torch.manual_seed(seed)
    vision = dict(VIT, image_size=image_size, patch_size=patch_size)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=TEXT_TOWER))
    randomize(model.vision_model, std=0.05)
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


# Words the tiny tokenizers are trained on: easy-vqa's, the chat formats', option letters.
WORDS = ("the a an is there what which color colour shape of in this image picture does not "
         "contain red blue green yellow black white gray teal brown circle square triangle "
         "rectangle yes no and it big small name describe answer with option's letter options "
         "A B C D E ( ) . , ? ! : ' USER ASSISTANT system user assistant [INST] [/INST] <<SYS>> "
         "<</SYS>> hello world 12 2024").split()
# Qwen2's split regex (tokenizer.json's Split pre-tokenizer): Llama-3's with single digits.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_TEMPLATE = (  # Qwen2-*-Instruct's chat template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = (  # the hub's Llama-2-chat template
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
    "system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
    "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def corpus(words, n=2000, seed=0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def sentencepiece_layouts() -> dict:
    """(normalizer, pre-tokenizer, decoder) of the SentencePiece-style layouts hub files use."""
    from tokenizers import decoders, normalizers, pre_tokenizers
    return {
        "llama2": (normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
                   None, decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                            decoders.Fuse(), decoders.Strip(" ", 1, 0)])),
        "metaspace-first": (None, pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False),
                            decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(" ", 1, 0)])),
        "metaspace-always-split": (None, pre_tokenizers.Metaspace("▁", prepend_scheme="always"),
                                   decoders.Metaspace("▁", prepend_scheme="always")),
    }


def train_sentencepiece_bpe(words, vocab_size=800, n=3000) -> tuple[dict, list]:
    """(vocab, merges) of a tiny SentencePiece-style BPE trained by `tokenizers`: words start with
    "▁" and merges stay inside words (as SentencePiece splits on whitespace); ids are the Llama
    order: <unk> <s> </s>, the 256 <0xNN> byte tokens, then the learned tokens."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    trainer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer.normalizer = sentencepiece_layouts()["llama2"][0]
    trainer.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="never")
    trainer.train_from_iterator(corpus(words, n), BpeTrainer(vocab_size=vocab_size,
                                                             special_tokens=SP_SPECIALS))
    learned = sorted(trainer.get_vocab().items(), key=lambda item: item[1])
    names = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + \
        [t for t, _ in learned if t not in SP_SPECIALS]
    merges = [tuple(m) for m in json.loads(trainer.to_str())["model"]["merges"]]
    return {t: i for i, t in enumerate(names)}, merges


def sentencepiece_tokenizer(vocab, merges, layout="llama2"):
    """The `tokenizers` Tokenizer of a SentencePiece-style BPE in one of the hub's layouts, with
    Llama's post-processor (<s> in front)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from tokenizers.models import BPE
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = sentencepiece_layouts()[layout]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SP_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def byte_level_bpe(words, pattern, specials, vocab_size=400):
    """A tiny byte-level BPE trained by `tokenizers` in the layout of Qwen2's and Llama-3's
    tokenizer.json (NFC, a Split regex, ByteLevel without its own regex), with `specials` added
    after the learned vocabulary, as the hub files have them."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(words, n=300), BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(specials)
    return tok


def write_qwen2(folder, seed=0, layers=LLM_LAYERS) -> Path:
    """A random Qwen2ForCausalLM (q/k/v biases; the embedding padded past the tokenizer, as
    Qwen2's 151936 rows hold 151646 tokens) and a tiny byte-level BPE with Qwen2's split regex,
    special tokens and chat template, all saved by transformers (the template in
    chat_template.jinja, where transformers now writes it)."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    folder = Path(folder)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(WORDS, QWEN2_PATTERN,
                                        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN2_TEMPLATE)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64 * (len(tok) // 64 + 2), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_llama2(folder, seed=0, layers=LLM_LAYERS) -> Path:
    """A random LlamaForCausalLM with a tiny SentencePiece-style BPE tokenizer.json in
    Llama-2's layout (byte fallback, <0xNN> tokens, "▁" for spaces) and Llama-2-chat's
    template, saved by transformers. (The hub repos also hold the SentencePiece model,
    tokenizer.model, which nothing here reads.)"""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = Path(folder)
    vocab, merges = train_sentencepiece_bpe(WORDS, n=1000)
    tok = PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(vocab, merges),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  chat_template=LLAMA2_TEMPLATE)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
    return cfg, env, seeded_job(cfg, env)
