"""
BERT's WordPiece tokenizer in pure Python: the Q-Former's text side (BLIP-2 / InstructBLIP read
the instruction with bert-base-uncased's vocabulary; the offline default with MiniLM's).

Basic tokenisation (clean-up, CJK spacing, lower case and accent stripping, punctuation splits),
then greedy longest-match-first WordPiece with '##' continuations, as BERT's original
tokenizer does; tests/test_qformer.py checks it against transformers' BertTokenizer.
"""
import re
import unicodedata
from pathlib import Path

import torch

from weights.checkpoint import CheckpointError, read_config, resolve_checkpoint

VOCAB_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    cp = ord(ch)  # every non-alphanumeric ASCII character counts, as in BERT
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(ch).startswith("P")


def _is_cjk(ch):
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class WordPieceTokenizer:
    """BERT's tokenizer (Devlin et al. 2019; google-research/bert tokenization.py): basic tokenization
    (drop control chars, whitespace-split, lower-case + strip accents, split punctuation and CJK
    characters), then greedy longest-match-first WordPiece with '##' continuations. Literal special
    tokens in the text ('[SEP]', ...) are kept whole, as transformers' BertTokenizer does. Accents
    are stripped when lower-casing unless `strip_accents` says otherwise (BERT's rule)."""

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab: dict[str, int], do_lower_case=True, strip_accents=None, max_word_chars=100):
        self.vocab, self.do_lower_case, self.max_word_chars = vocab, do_lower_case, max_word_chars
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents
        self.inv_vocab = {i: t for t, i in vocab.items()}
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self._present = [t for t in self.specials if t in vocab]
        self._special_re = re.compile("(" + "|".join(map(re.escape, self._present)) + ")")

    @classmethod
    def from_pretrained(cls, name_or_path):
        """From a hub id or folder holding a WordPiece vocabulary (see from_folder)."""
        folder = resolve_checkpoint(name_or_path, VOCAB_FILES)
        found = cls.from_folder(folder)
        if found is None:
            raise CheckpointError(f"{folder}: no WordPiece vocabulary (vocab.txt, or a "
                                  "tokenizer.json with a WordPiece model)")
        return found

    @classmethod
    def from_folder(cls, folder) -> "WordPieceTokenizer | None":
        """vocab.txt (one token a line, id = line number), else a tokenizer.json whose model is
        WordPiece (transformers 5 saves a BERT tokenizer as that alone), with the case options
        of tokenizer_config.json, else of the tokenizer.json's normalizer. None when the folder
        holds neither (a tokenizer.json of another model, e.g. an LLM's BPE, does not count)."""
        folder = Path(folder)
        cfg = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = read_config(folder, "tokenizer_config.json")
        if (folder / "vocab.txt").is_file():
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
            vocab = {tok: i for i, tok in enumerate(lines[:-1] if lines[-1] == "" else lines)}
        elif (folder / "tokenizer.json").is_file():
            spec = read_config(folder, "tokenizer.json")
            if spec.get("model", {}).get("type") != "WordPiece":
                return None
            vocab, normalizer = spec["model"]["vocab"], spec.get("normalizer") or {}
            cfg = {"do_lower_case": normalizer.get("lowercase", True),
                   "strip_accents": normalizer.get("strip_accents")} | cfg
        else:
            return None
        return cls(vocab, cfg.get("do_lower_case", True), cfg.get("strip_accents"))

    def basic_tokenize(self, text: str) -> list[str]:
        text = "".join(" " if _is_whitespace(c) else c for c in text
                       if not (ord(c) in (0, 0xFFFD) or _is_control(c)))
        text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
        words = []
        for word in unicodedata.normalize("NFC", text).split():
            if self.do_lower_case:
                word = word.lower()
            if self.strip_accents:  # decompose, drop the combining marks
                word = unicodedata.normalize("NFD", word)
                word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            words.extend(self._split_punctuation(word))
        return " ".join(words).split()

    @staticmethod
    def _split_punctuation(word):
        pieces, start_new = [], True
        for c in word:
            if _is_punctuation(c):
                pieces.append(c)
                start_new = True
            elif start_new:
                pieces.append(c)
                start_new = False
            else:
                pieces[-1] += c
        return pieces

    def wordpiece(self, word: str) -> list[str]:
        if len(word) > self.max_word_chars:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for part in self._special_re.split(text):
            if part in self._present:
                tokens.append(part)
            else:
                tokens.extend(p for w in self.basic_tokenize(part) for p in self.wordpiece(w))
        return tokens

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = [self.vocab[t] for t in self.tokenize(text)]
        if max_length is not None:
            ids = ids[:max_length - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def __call__(self, texts: list[str], max_length=128, padding: bool | str = True):
        """-> input_ids (B, T), attention_mask (B, T), both LongTensor. padding: True / 'longest'
        pads to the longest text, 'max_length' to max_length, False needs equal lengths."""
        rows = [self.encode(t, max_length) for t in texts]
        width = max_length if padding == "max_length" else max(map(len, rows))
        if not padding and any(len(r) != width for r in rows):
            raise ValueError("texts encode to different lengths; pass padding=True")
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return ids, mask

    def decode(self, ids, skip_special_tokens=True) -> str:
        tokens = [self.inv_vocab[int(i)] for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self.specials]
        return " ".join(tokens).replace(" ##", "")
