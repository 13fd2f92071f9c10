"""text/tokenizer.py against the `tokenizers` library and transformers (test-only references) on the
converted SmolLM2 folder, GPT-2's BPE ranks, and tiny Llama-3-style tokenizers written here."""
import base64
import json
import random

import pytest
import tokenizers
import transformers
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import TikTokenConverter

from weights.checkpoint import CheckpointError
from weights.offline import gpt2_ranks_path, smollm2_folder
from text.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL, load_tokenizer

SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>",
                 "<jupyter_code>", "<empty_output>"]
SCRIPTS = [(0x430, 0x44F), (0x3B1, 0x3C9), (0x4E00, 0x4FFF), (0x627, 0x64A), (0x905, 0x939),
           (0xAC00, 0xACFF), (0x5D0, 0x5EA), (0xE01, 0xE30), (0x1F600, 0x1F64F)]
FRAGMENTS = {
    "space": [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009"],
    "punct": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "?!", "--", "://", "``", "<|", "|>"],
    "contraction": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "n't"],
    "number": ["²", "½", "Ⅻ", "٣", "४", "０", "3.14", "1,000", "2024", "007"],
    "emoji": ["👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "e\u0301", "\u200b", "\ufeff"],
    "word": ["hello", "World", "the", "I", "don't", "they'll", "naïve", "café", "Straße", "ﬁne"],
}


def random_text(rng: random.Random, specials=()) -> str:
    parts = []
    for _ in range(rng.randint(1, 16)):
        kind = rng.choice(["letters", "digits", "script", "any", "special"] + list(FRAGMENTS))
        if kind == "letters":
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
            parts.append(word.capitalize() if rng.random() < 0.3 else word)
        elif kind == "digits":
            parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 7))))
        elif kind == "script":
            lo, hi = rng.choice(SCRIPTS)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 5))))
        elif kind == "any":  # any BMP code point outside the surrogates
            parts.append(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0xFFFD)])))
        elif kind == "special":
            if specials:
                parts.append(rng.choice(specials))
        else:
            parts.append(rng.choice(FRAGMENTS[kind]))
    return "".join(parts)


def texts(seed, n, specials=()):
    rng = random.Random(seed)
    return [random_text(rng, specials) for _ in range(n)]


@pytest.fixture(scope="module")
def smol():
    folder = smollm2_folder()
    return folder, load_tokenizer(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def mismatches(ours_fn, ref_fn, strings):
    bad = [(s, ours_fn(s), ref_fn(s)) for s in strings]
    return [b for b in bad if b[1] != b[2]]


def test_smollm2_matches_tokenizers_library(smol):
    _, tok, ref = smol
    strings = texts(0, 1200)
    assert mismatches(tok.encode, lambda s: ref.encode(s, add_special_tokens=False).ids, strings) == []
    for s in strings:
        ids = tok.encode(s)
        assert tok.decode(ids) == s == ref.decode(ids, skip_special_tokens=False)


def test_smollm2_special_tokens(smol):
    _, tok, ref = smol
    strings = texts(1, 300, SMOL_SPECIALS)
    assert sum(any(t in s for t in SMOL_SPECIALS) for s in strings) > 100
    allowed = mismatches(lambda s: tok.encode(s, allow_special=True),
                         lambda s: ref.encode(s, add_special_tokens=False).ids, strings)
    assert allowed == []
    ref.encode_special_tokens = True  # special-token text as plain text, like allow_special=False
    try:
        plain = mismatches(tok.encode, lambda s: ref.encode(s, add_special_tokens=False).ids, strings)
    finally:
        ref.encode_special_tokens = False
    assert plain == []
    assert tok.encode("<|im_end|>", allow_special=True) == [2] != tok.encode("<|im_end|>")
    assert tok.decode(tok.encode("a<|im_start|>b", allow_special=True)) == "a<|im_start|>b"


def test_smollm2_matches_transformers(smol):
    """transformers' tokenizers-backed class on the folder. (AutoTokenizer picks the hub's
    tokenizer_class GPT2Tokenizer, which in transformers 5 swaps the tokenizer.json
    pre-tokenizer for plain ByteLevel, dropping Digits: "\r\n1" then splits differently.)"""
    folder, tok, _ = smol
    auto = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (auto.bos_token_id, auto.eos_token_id,
                                                    auto.pad_token_id) == (1, 2, 2)
    assert tok.stop_ids == (2,) and tok.vocab_size == 49152 == len(auto)
    assert tok.special_tokens == {t.content: i for i, t in auto.added_tokens_decoder.items()}
    strings = texts(2, 200)
    assert mismatches(tok.encode, lambda s: auto.encode(s, add_special_tokens=False), strings) == []
    rng = random.Random(3)
    for _ in range(200):  # arbitrary ids: byte sequences cut mid-character, special tokens
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=False)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\nHow are you?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "  and 3+3?  "}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "<image>\nDescribe the image."}],
]


def chat_ids(auto, conversation, add_generation_prompt):
    out = auto.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_matches_apply_chat_template(smol, add_generation_prompt):
    folder, tok, _ = smol
    auto = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    assert auto.chat_template == transformers.AutoTokenizer.from_pretrained(folder).chat_template
    for conversation in CONVERSATIONS:
        text = auto.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                        tokenize=False)
        assert tok.render_chat(conversation, add_generation_prompt) == text
        assert tok.encode_chat(conversation, add_generation_prompt) == \
            chat_ids(auto, conversation, add_generation_prompt)
    assert "named SmolLM" in tok.render_chat(CONVERSATIONS[0])
    assert "named SmolLM" not in tok.render_chat(CONVERSATIONS[1])


def gpt2_reference() -> tokenizers.Tokenizer:
    """GPT-2 as the `tokenizers` library runs it: merges recovered from the same ranks by
    transformers' TikTokenConverter, and the library's own ByteLevel regex (not our pattern)."""
    path = str(gpt2_ranks_path())
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    ref = tokenizers.Tokenizer(BPE(vocab, merges, fuse_unk=False))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True)])
    return ref


def test_gpt2_from_whisper_ranks():
    tok = load_tokenizer("gpt2")
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.bos_id == tok.eos_id == 50256 and tok.stop_ids == (50256,) and tok.vocab_size == 50257
    ref = gpt2_reference()
    assert ref.token_to_id("<|endoftext|>") == 50256
    strings = texts(4, 600, ["<|endoftext|>"])
    assert mismatches(lambda s: tok.encode(s, allow_special=True),
                      lambda s: ref.encode(s, add_special_tokens=False).ids, strings) == []
    assert all(tok.decode(tok.encode(s)) == s for s in strings)


def test_gpt2_model_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert load_tokenizer(tmp_path).encode("hello world") == [31373, 995]


def tiny_ranks() -> dict[bytes, int]:
    """All 256 bytes, then a handful of merges that build "hello" and " world"."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"12"]:
        ranks[token] = len(ranks)
    return ranks


def write_tiktoken(ranks, path):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def test_llama3_tokenizer_model(tmp_path):
    write_tiktoken(tiny_ranks(), tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    ranks = tiny_ranks()
    n = len(ranks)
    assert tok.special_tokens["<|begin_of_text|>"] == n and tok.special_tokens["<|eot_id|>"] == n + 9
    assert len(tok.special_tokens) == 256 and tok.vocab_size == n + 256
    assert tok.encode("hello world") == [ranks[b"hello"], ranks[b" world"]]
    assert tok.encode("1234") == [ranks[b"12"], ord("3"), ord("4")]  # \p{N}{1,3} splits "123" "4"
    assert tok.bos_id == n and tok.eos_id == n + 1 and tok.stop_ids == (n + 9, n + 1)
    chat = tok.render_chat([{"role": "user", "content": " hello "}])
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[:2] == [n, n + 6] and ids[-2:] == [ord("\n"), ord("\n")]
    assert tok.decode(ids) == chat.replace(" hello ", "hello")


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_split_regex_tokenizer_json_matches_tokenizers(tmp_path):
    """A Llama-3-style tokenizer.json (Split regex + ByteLevel without regex, NFC like Qwen2)
    written by the `tokenizers` library, and its Llama-3 chat template via transformers."""
    write_tiktoken(tiny_ranks(), tmp_path / "ranks.tiktoken")
    ref = TikTokenConverter(vocab_file=str(tmp_path / "ranks.tiktoken"), pattern=LLAMA3_PATTERN,
                            extra_special_tokens=LLAMA3_SPECIAL).converted()
    ref.normalizer = tokenizers.normalizers.NFC()
    ref.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "llama3" and tok.stop_ids == (tok.special_tokens["<|eot_id|>"],)
    strings = texts(5, 300, ["<|eot_id|>", "<|begin_of_text|>"]) + ["e\u0301 hello", "Å"]
    assert mismatches(lambda s: tok.encode(s, allow_special=True),
                      lambda s: ref.encode(s, add_special_tokens=False).ids, strings) == []
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for conversation in CONVERSATIONS:
        assert tok.render_chat(conversation) == auto.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False)


def test_unsupported_tokenizers_are_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [], "normalizer": None, "pre_tokenizer": {"type": "Metaspace"},
        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    with pytest.raises(CheckpointError, match="unsupported pre_tokenizer"):
        load_tokenizer(tmp_path)
    sentencepiece = tmp_path / "sp"
    sentencepiece.mkdir()
    (sentencepiece / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(CheckpointError, match="SentencePiece"):
        load_tokenizer(sentencepiece)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
