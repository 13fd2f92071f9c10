"""
Byte-level BPE tokenizers of the hub's decoder LLMs, run by tiktoken, SentencePiece-style BPE
(Llama-2, Vicuna, Mistral-v0.1; text/sentencepiece.py), plus each model's chat format. No
`tokenizers`/`transformers` here: the hub's tokenizer.json is read as plain JSON.

How a hub tokenizer.json becomes a tiktoken Encoding (our reconstruction, checked against the
`tokenizers` library token for token in tests/test_tokenizer.py):
  - ranks: every vocab entry's string is decoded to bytes through GPT-2's byte-to-unicode table,
    and its rank is its id. tiktoken merges the adjacent pair whose concatenation has the lowest
    rank, which equals the merge-list order when ids were assigned in merge order (true for
    GPT-2, SmolLM2, Qwen2 and Llama-3).
  - the split regex is read off the pre-tokenizer: plain ByteLevel = GPT-2's pattern; Digits
    (individual) + ByteLevel = GPT-2's pattern with each digit a piece of its own (SmolLM2);
    Split(regex) + ByteLevel(no regex) = that regex (Qwen2, Llama-3).
  - added tokens become tiktoken special tokens with their ids.
Llama-3's original tokenizer.model is already in tiktoken's format (base64 bytes, rank per line);
its 256 special tokens follow the ranks, as in Meta's llama-models tokenizer.

Chat formats: ChatML (SmolLM2, Qwen2; the template's default system message is inserted when the
conversation has none, as the template does), Llama-3, Llama-2 chat (its hub template: "<s>[INST]
<<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]"), Vicuna
v1 (LLaVA's conv_vicuna_v1: "<s>{system} USER: {user} ASSISTANT: {answer}</s>USER: {user}
ASSISTANT:"; a missing or empty system message is LLaVA's, as LLaVA always writes one), and for
base models without any of them a plain "role: content" format of our own. The format is read
off the chat template (ChatML, Llama-3, Llama-2): chat_template.jinja, where transformers saves it
now and which wins as in transformers, else tokenizer_config.json's entry; or chosen by name
(load_tokenizer's chat_format, train.py's --chat-format); Vicuna has no template to detect.
"""
import base64
import binascii
import json
import re
import unicodedata
from pathlib import Path

import tiktoken

from text.sentencepiece import SentencePieceBPE, is_sentencepiece_bpe
from weights.checkpoint import CheckpointError, resolve_checkpoint
from weights.offline import gpt2_ranks_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model",
                   "config.json", "generation_config.json")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's pattern after the Digits pre-tokenizer: a digit is a piece, and it ends the piece before
# it, so a whitespace run followed by a digit is taken whole (as at the end of a string)
DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]

CHATML, LLAMA3, LLAMA2, VICUNA, PLAIN = "chatml", "llama3", "llama2", "vicuna", "plain"
CHAT_FORMATS = (CHATML, LLAMA3, LLAMA2, VICUNA, PLAIN)
END_OF_TURN = {CHATML: "<|im_end|>", LLAMA3: "<|eot_id|>"}
FORMAT_TOKENS = {CHATML: ("<|im_start|>", "<|im_end|>"),      # the special tokens a format writes
                 LLAMA3: ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>")}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")


class Tokenizer:
    """encode/decode over a tiktoken Encoding or a SentencePieceBPE, the special ids, and the
    model's chat format."""

    def __init__(self, enc: tiktoken.Encoding | SentencePieceBPE, special_tokens: dict[str, int],
                 chat_format: str,
                 bos: str | None = None, eos: str | None = None, pad: str | None = None,
                 default_system: str | None = None, extra_stop_ids=(), always_split=(),
                 nfc: bool = False):
        self.enc = enc
        self.special_tokens = dict(special_tokens)
        self.vocab_size = enc.n_vocab
        self.chat_format, self.default_system, self.nfc = chat_format, default_system, nfc
        self.always_split = set(always_split)  # added tokens that are matched even in plain text
        self.bos_token, self.eos_token = bos, eos
        self.bos_id, self.eos_id, self.pad_id = (None if t is None else self.token_id(t)
                                                 for t in (bos, eos, pad))
        end = END_OF_TURN.get(chat_format)
        stops = [self.special_tokens[end]] if end in self.special_tokens else []
        stops += [self.eos_id] if self.eos_id is not None else []
        self.stop_ids = tuple(dict.fromkeys(stops + list(extra_stop_ids)))  # end of turn first
        if not self.stop_ids:
            raise CheckpointError("tokenizer has no end-of-turn or end-of-sequence token")

    def token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            raise CheckpointError(f"token {token!r} is not in the vocabulary") from None

    def encode(self, text: str, allow_special: bool = False, continuing: bool = False) -> list[int]:
        """Token ids. Special-token text (e.g. "<|im_end|>") becomes its id only when
        allow_special; otherwise it is tokenized as the plain text it is. continuing: the text
        continues earlier text (a piece of a rendered chat), so a SentencePiece tokenizer puts
        no "▁" in front of it; byte-level BPE has no such marker."""
        if isinstance(self.enc, SentencePieceBPE):
            return self.enc.encode(text, allow_special, continuing)
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        allowed = "all" if allow_special else self.always_split
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids) -> str:
        """Ids past the vocabulary are skipped, as the reference does: a model's embedding may
        be padded beyond its tokenizer (Qwen2's 151936 rows hold 151646 tokens), and an
        untrained model can generate those ids."""
        return self.enc.decode([i for i in ids if i < self.vocab_size], errors="replace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it."""
        if self.chat_format == CHATML:
            if self.default_system and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.chat_format == LLAMA3:
            text = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                for m in messages)
            prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"
            return text + (prompt if add_generation_prompt else "")
        if self.chat_format == LLAMA2:
            return render_llama2(messages, self.bos_token or "", self.eos_token or "")
        if self.chat_format == VICUNA:
            return render_vicuna(messages, add_generation_prompt, self.bos_token or "",
                                 self.eos_token or "")
        text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), allow_special=True)


def render_llama2(messages: list[dict], bos: str, eos: str) -> str:
    """Llama-2 chat's hub template: a system message opens the first user turn inside <<SYS>>;
    contents are stripped; the text after the last user turn is already the generation prompt."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    text = ""
    for k, m in enumerate(messages[1:] if system is not None else messages):
        content = m["content"]
        if k == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            text += f"{bos}[INST] {content.strip()} [/INST]"
        elif m["role"] == "assistant":
            text += f" {content.strip()} {eos}"
    return text


def render_vicuna(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """LLaVA's conv_vicuna_v1 (separator style TWO, sep " ", sep2 "</s>") after the BOS token its
    training adds: system, then "USER: q " and "ASSISTANT: a</s>"; the prompt ends "ASSISTANT:"."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    text = bos + (system or VICUNA_SYSTEM) + " "
    for m in messages:
        if m["role"] == "user":
            text += f"USER: {m['content']} "
        elif m["role"] == "assistant":
            text += f"ASSISTANT: {m['content']}{eos}"
    return text + ("ASSISTANT:" if add_generation_prompt else "")


# ----------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path, chat_format: str = "auto") -> Tokenizer:
    """From a local folder or hub repo id: tokenizer.json (byte-level or SentencePiece-style
    BPE), else Llama-3's tiktoken-format tokenizer.model, else (config.json says gpt2) GPT-2.
    "gpt2" itself is GPT-2 from the BPE ranks openai-whisper ships, which works offline.
    chat_format: one of CHAT_FORMATS, or "auto" to read it off the chat template."""
    if str(name_or_path) == "gpt2":
        return gpt2_tokenizer(chat_format)
    folder = resolve_checkpoint(name_or_path, allow_patterns=TOKENIZER_FILES)
    tok_cfg = read_optional(folder / "tokenizer_config.json")
    model_cfg = read_optional(folder / "config.json")
    gen_cfg = read_optional(folder / "generation_config.json")
    if (folder / "tokenizer.json").is_file():
        enc, specials, always_split, nfc = encoding_from_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        enc, specials = llama3_encoding(folder / "tokenizer.model")
        always_split, nfc = (), False
        tok_cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", **tok_cfg}
    elif model_cfg.get("model_type") == "gpt2":
        return gpt2_tokenizer(chat_format)
    else:
        raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model")
    ids_to_token = {i: t for t, i in specials.items()}

    def token(key):  # tokenizer_config's text (or {"content": text}), else config's id
        value = tok_cfg.get(f"{key}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            value = ids_to_token.get(model_cfg.get(f"{key}_token_id"))
        return value

    template = tok_cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():   # where transformers now saves it; it wins
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if chat_format == "auto":
        chat_format = detect_chat_format(specials, template)
    check_chat_format(chat_format, specials, token("bos"), token("eos"), folder)
    gen_eos = gen_cfg.get("eos_token_id", [])
    return Tokenizer(enc, specials, chat_format, bos=token("bos"), eos=token("eos"), pad=token("pad"),
                     default_system=default_system(template, chat_format),
                     extra_stop_ids=gen_eos if isinstance(gen_eos, list) else [gen_eos],
                     always_split=always_split, nfc=nfc)


def read_optional(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def detect_chat_format(specials: dict, template) -> str:
    """From the chat template when there is one (a list of named templates: the default one),
    else from the special tokens."""
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template and "[INST]" in template and "<<SYS>>" in template:
        return LLAMA2
    if template:
        evidence = template
        if "<|im_start|>" not in template and "<|start_header_id|>" not in template:
            raise CheckpointError("chat template is not ChatML, Llama-3 or Llama-2 chat; choose a "
                                  f"format by name (--chat-format: {', '.join(CHAT_FORMATS)}):\n"
                                  f"{template[:300]}")
    else:
        evidence = " ".join(specials)
    if "<|im_start|>" in evidence and "<|im_end|>" in specials:
        return CHATML
    if "<|start_header_id|>" in evidence and "<|eot_id|>" in specials:
        return LLAMA3
    return PLAIN


def check_chat_format(chat_format: str, specials: dict, bos, eos, folder):
    """The format is known and the tokenizer has the special tokens it writes."""
    if chat_format not in CHAT_FORMATS:
        raise CheckpointError(f"unknown chat format {chat_format!r}: choose one of "
                              f"{', '.join(CHAT_FORMATS)} (or auto)")
    needed = FORMAT_TOKENS.get(chat_format, (bos, eos) if chat_format in (LLAMA2, VICUNA) else ())
    missing = [t for t in needed if t is None or t not in specials]
    if missing:
        raise CheckpointError(f"{folder}: chat format {chat_format} writes "
                              f"{', '.join(map(str, needed))}, but the tokenizer lacks "
                              f"{', '.join(map(str, missing))}")


def default_system(template, chat_format: str) -> str | None:
    """The system message a ChatML template writes when the conversation has none."""
    if chat_format != CHATML or not isinstance(template, str):
        return None
    found = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]+?)<\|im_end\|>", template)
    return found.group(1) if found else None


def gpt2_tokenizer(chat_format: str = "auto") -> Tokenizer:
    """GPT-2, in the plain chat format unless another is chosen."""
    ranks = read_tiktoken_ranks(gpt2_ranks_path())
    end = "<|endoftext|>"
    specials = {end: 50256}
    chat_format = PLAIN if chat_format == "auto" else chat_format
    check_chat_format(chat_format, specials, end, end, "gpt2")
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, specials, chat_format, bos=end, eos=end)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's BPE file: one "base64(token bytes) rank" per line."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CheckpointError(f"{path}:{n}: not a tiktoken BPE file (a SentencePiece "
                                  "tokenizer.model is not supported)") from None
    return ranks


def llama3_encoding(path: Path) -> tuple[tiktoken.Encoding, dict[str, int]]:
    ranks = read_tiktoken_ranks(path)
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)}
    enc = tiktoken.Encoding(path.parent.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    return enc, specials


def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def split_pattern(pre: dict | None, path: Path) -> str:
    """The regex that reproduces a tokenizer.json pre-tokenizer (see the module docstring)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    first, last = steps[0], steps[-1]
    byte_level = kinds[-1] == "ByteLevel" and not last.get("add_prefix_space")
    regex = last.get("use_regex", True)
    if byte_level and kinds == ["ByteLevel"] and regex:
        return GPT2_PATTERN
    if byte_level and kinds == ["Digits", "ByteLevel"] and first.get("individual_digits") and regex:
        return DIGITS_PATTERN
    if (byte_level and kinds == ["Split", "ByteLevel"] and not regex and "Regex" in first.get("pattern", {})
            and first.get("behavior") == "Isolated" and not first.get("invert")):
        return first["pattern"]["Regex"]
    raise CheckpointError(f"{path}: unsupported pre_tokenizer {pre} (supported, all without a prefix "
                          "space: ByteLevel; Digits + ByteLevel; Split regex + ByteLevel)")


def encoding_from_tokenizer_json(path: Path):
    """(encoding, special tokens {text: id}, added non-special tokens, NFC?) from a `tokenizers`
    tokenizer.json: a tiktoken Encoding for byte-level BPE, a SentencePieceBPE (which splits on
    its own added tokens) for SentencePiece-style BPE."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    if is_sentencepiece_bpe(spec):
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        return SentencePieceBPE(spec, path), added, set(), False
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: model {model.get('type')} is not a BPE")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise CheckpointError(f"{path}: unsupported normalizer {normalizer}")
    pattern = split_pattern(spec.get("pre_tokenizer"), path)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    to_byte = unicode_to_byte()
    ranks = {}
    for token, i in model["vocab"].items():
        if token in added:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = i
        except KeyError:
            raise CheckpointError(f"{path}: vocab entry {token!r} is not byte-level") from None
    if len(ranks) != len(model["vocab"]) - len(set(model["vocab"]) & set(added)):
        raise CheckpointError(f"{path}: two vocab entries decode to the same bytes")
    enc = tiktoken.Encoding(Path(path).parent.name, pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=added)
    always_split = {t["content"] for t in spec.get("added_tokens", []) if not t.get("special")}
    return enc, added, always_split, normalizer == "NFC"
