"""text/tokenizer.py against the `tokenizers` library and transformers (test-only references) on the
converted SmolLM2 folder, GPT-2's BPE ranks, tiny Llama-3-style tokenizers written here, and a tiny
SentencePiece-style BPE (the Llama-2 layout) trained here, with the Llama-2 and Vicuna chat
formats."""
import base64
import json
import random

import pytest
import tokenizers
import transformers
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import TikTokenConverter

import tiny
from tiny import LLAMA2_TEMPLATE, SP_SPECIALS
from data.collate import encode_conversation
from weights.checkpoint import CheckpointError
from weights.offline import gpt2_ranks_path, smollm2_folder
from text.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL, VICUNA_SYSTEM, load_tokenizer

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
    past = [tok.vocab_size, tok.vocab_size + 7]   # a padded embedding's rows: no tokens
    assert tok.decode([42] + past + [43]) == auto.decode([42] + past + [43]) == tok.decode([42, 43])


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
        "added_tokens": [], "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
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


# ---- SentencePiece-style BPE (Llama-2 / Vicuna / Mistral-v0.1 layout) and its chat formats ------

SP_WORDS = ("the a chat between curious user and an artificial intelligence assistant gives helpful "
            "detailed polite answers to questions what colour is shape red blue green circle square "
            "triangle yes no there image describe hello world café naïve déjà vu 東京 中文 12 2024 "
            "3.14 ( ) , . ? ! : ; - ' USER ASSISTANT [INST] [/INST] <<SYS>> <</SYS>> don't").split()
SP_LAYOUTS = tiny.sentencepiece_layouts()   # the layouts hub files use


@pytest.fixture(scope="module")
def sp_model():
    """(vocab, merges) of a tiny SentencePiece-style BPE (tiny.train_sentencepiece_bpe)."""
    return tiny.train_sentencepiece_bpe(SP_WORDS)


def sp_folder(path, sp_model, layout="llama2", chat_template=None):
    """A hub-layout folder with the tokenizer.json `tokenizers` writes for the layout (Llama's
    post-processor puts <s> in front) -> (folder, the reference tokenizer)."""
    path.mkdir(exist_ok=True)
    tiny.sentencepiece_tokenizer(*sp_model, layout).save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(
        config | ({"chat_template": chat_template} if chat_template else {})))
    return path, tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


def byte_fallback_texts(seed, n):
    """Characters the tiny vocabulary lacks: every one is spelled in <0xNN> byte tokens."""
    rng = random.Random(seed)
    return ["".join(chr(rng.choice([rng.randint(0x80, 0x7FF), rng.randint(0x3040, 0x9FFF),
                                     rng.randint(0x1F300, 0x1FAFF), ord(rng.choice(" \n\tab"))]))
                    for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("layout", list(SP_LAYOUTS))
def test_sentencepiece_bpe_matches_tokenizers(tmp_path, sp_model, layout):
    """Parity on 1,000 random strings (ASCII, space runs, newlines, tabs, digits, punctuation,
    accented Latin, CJK, emoji, <s> / </s> / <unk> text) and 200 strings of characters that need
    byte fallback: encode with and without special tokens, decode, and <s> from the reference's
    post-processor, which our encode leaves to the chat format."""
    folder, ref = sp_folder(tmp_path / layout, sp_model, layout)
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.vocab_size) == (1, 2, (2,), ref.get_vocab_size())
    strings = texts(11, 1000, SP_SPECIALS) + byte_fallback_texts(12, 200)
    bytes_used = sum(any(3 <= i < 259 for i in tok.encode(s)) for s in strings)
    assert bytes_used > 400 and sum(" " in s or "\t" in s or "\n" in s for s in strings) > 500
    assert mismatches(lambda s: tok.encode(s, allow_special=True),
                      lambda s: ref.encode(s, add_special_tokens=False).ids, strings) == []
    assert all(ref.encode(s).ids == [1] + tok.encode(s, allow_special=True) for s in strings[:200])
    ref.encode_special_tokens = True   # special-token text as plain text, like allow_special=False
    assert mismatches(tok.encode, lambda s: ref.encode(s, add_special_tokens=False).ids, strings) == []
    assert mismatches(lambda s: tok.decode(tok.encode(s, allow_special=True)),
                      lambda s: ref.decode(tok.encode(s, allow_special=True), skip_special_tokens=False),
                      strings) == []
    rng = random.Random(13)
    for _ in range(200):  # arbitrary ids: byte tokens that are not UTF-8, special tokens
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    if layout == "llama2":  # the layout round-trips every string without a literal "▁"
        assert all(tok.decode(tok.encode(s)) == s for s in strings if "▁" not in s)


def test_llama2_chat_format_matches_apply_chat_template(tmp_path, sp_model):
    folder, ref = sp_folder(tmp_path / "llama2", sp_model, chat_template=LLAMA2_TEMPLATE)
    tok = load_tokenizer(folder)
    assert tok.chat_format == "llama2"
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS:
        text = auto.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert tok.render_chat(conversation) == text
        assert tok.encode_chat(conversation) == ref.encode(text, add_special_tokens=False).ids
    assert tok.render_chat(CONVERSATIONS[2]) == \
        "<s>[INST] 2+2? [/INST] 4 </s><s>[INST] and 3+3? [/INST]"
    assert load_tokenizer(folder, chat_format="vicuna").chat_format == "vicuna"


def test_chat_template_jinja_as_transformers_saves_it(tmp_path, sp_model):
    """transformers now saves the template to chat_template.jinja and drops it from
    tokenizer_config.json: it is read from there (and wins, as in transformers), for the format
    and for ChatML's default system message."""
    folder, _ = sp_folder(tmp_path / "llama2", sp_model, chat_template=LLAMA2_TEMPLATE)
    for source in (folder, smollm2_folder()):
        auto = transformers.AutoTokenizer.from_pretrained(source)
        auto.save_pretrained(tmp_path / "saved")
        assert "chat_template" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
        tok, original = load_tokenizer(tmp_path / "saved"), load_tokenizer(source)
        assert (tok.chat_format, tok.default_system) == (original.chat_format, original.default_system)
        for conversation in CONVERSATIONS:
            assert tok.render_chat(conversation) == auto.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False)
    assert load_tokenizer(tmp_path / "saved").default_system   # SmolLM2's: "You are a helpful ..."


def test_vicuna_v1_is_llavas_conv_vicuna_v1(tmp_path, sp_model):
    """The string LLaVA's conv_vicuna_v1 writes (separator style TWO: " " after a user turn,
    "</s>" after an answer), after the <s> its tokenizer adds; chosen by name, as Vicuna's
    tokenizer_config has no chat template."""
    folder, ref = sp_folder(tmp_path / "vicuna", sp_model)
    assert load_tokenizer(folder).chat_format == "plain"
    tok = load_tokenizer(folder, chat_format="vicuna")
    turns = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "Which shape?"}]
    text = tok.render_chat(turns)
    assert text == (f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat colour? ASSISTANT: red</s>"
                    "USER: Which shape? ASSISTANT:")
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. "
                             "The assistant gives helpful, detailed, and polite answers to the user's "
                             "questions.")
    assert tok.render_chat([{"role": "system", "content": "Be brief."}] + turns[:2], False) == \
        "<s>Be brief. USER: <image>\nWhat colour? ASSISTANT: red</s>"
    assert tok.encode_chat(turns) == ref.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("chat_format", ["llama2", "vicuna"])
def test_two_turn_conversation_labels_exactly_the_two_answers(tmp_path, sp_model, chat_format):
    """data.collate renders the format with placeholders and cuts it: a text-only conversation
    gets exactly the reference's ids of its whole rendered text, and the labels are the two
    answers (with Llama-2's " " before </s>) and their </s>; with an image, the same labels."""
    folder, ref = sp_folder(tmp_path / chat_format, sp_model)
    tok = load_tokenizer(folder, chat_format=chat_format)
    turns = [("What colour is the shape?", "red"), ("Is there a circle?", "no, a square")]
    messages = [{"role": "system", "content": ""}]
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    whole = ref.encode(tok.render_chat(messages, add_generation_prompt=False), add_special_tokens=False)
    for n_visual in (0, 3):
        e = encode_conversation(tok, "", turns, n_visual)
        if n_visual == 0:
            assert e.input_ids == whole.ids
        runs = "".join("x" if label != -100 else " " for label in e.labels).split()
        assert len(runs) == 2
        labelled = [label for label in e.labels if label != -100]
        answers = tok.decode(labelled).split("</s>")
        assert [a.strip() for a in answers] == ["red", "no, a square", ""]
        assert labelled.count(2) == 2 and labelled[-1] == 2
        assert sum(e.image_mask) == n_visual


def test_chat_format_choice_errors(tmp_path, sp_model):
    folder, _ = sp_folder(tmp_path / "sp", sp_model)
    with pytest.raises(CheckpointError, match="unknown chat format 'alpaca'"):
        load_tokenizer(folder, chat_format="alpaca")
    with pytest.raises(CheckpointError, match="lacks <\\|im_start\\|>"):
        load_tokenizer(folder, chat_format="chatml")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    with pytest.raises(CheckpointError, match="--chat-format"):
        load_tokenizer(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "WordPiece", "prefix": "##"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="unsupported decoder"):
        load_tokenizer(folder, chat_format="llama2")


def test_sentencepiece_bpe_merges_only_listed_pairs(tmp_path):
    """Why text/sentencepiece.py is not tiktoken: with merges [b c], [a b], [ab c], "abc" is
    a + bc (a + bc is not a listed merge); tiktoken's rank order would merge it into abc."""
    vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "c": 4, "bc": 5, "ab": 6, "abc": 7}
    ref = tokenizers.Tokenizer(BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")], unk_token="<unk>",
                                   byte_fallback=True))
    ref.normalizer = SP_LAYOUTS["llama2"][0]
    ref.add_special_tokens([tokenizers.AddedToken("</s>", special=True, normalized=False)])
    ref.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    for text in ["abc", "ab c", "xabcab", "cab"]:
        assert tok.encode(text) == ref.encode(text).ids
    assert tok.encode("abc") == [1, 2, 5] and tok.encode("ab c") == [1, 6, 1, 4]
    assert tok.encode("x") == [1, 0]   # no byte tokens in this vocabulary: <unk>
