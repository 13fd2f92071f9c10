"""
SentencePiece-style BPE from a `tokenizers` tokenizer.json (the Llama-2 / Vicuna /
Mistral-v0.1 layout), in pure Python: the BPE model with `byte_fallback`, the "▁" space marker,
added tokens such as <s>, </s>, <unk>. No `tokenizers` here: the file is read as plain JSON, and
each step below reconstructs what the `tokenizers` library does (checked id for id against it in
tests/test_tokenizer.py):
  - added tokens split the text first (leftmost, longest first); special ones only when allowed.
  - each piece between them is normalized: Prepend "▁" (not to an empty piece) and Replace " "
    by "▁" (the Llama-2 layout), or, in the Metaspace pre-tokenizer layout, spaces become "▁",
    "▁" goes in front by its prepend_scheme (always; first: only at the start of the text), and
    with split the piece is cut before every "▁".
  - BPE on each word: its characters are the starting symbols (a character missing from the
    vocabulary becomes its UTF-8 bytes as <0xNN> tokens, or <unk>); then the adjacent pair with
    the lowest merge rank is merged, the leftmost first among equals, until no pair is a merge.
  - decoding runs the file's decoder chain (Replace, ByteFallback, Fuse, Strip, Metaspace).
The post-processor (Llama's TemplateProcessing, which puts <s> in front) is not applied: encode
never adds <s>; the chat formats write it (text/tokenizer.py), as the models' templates do.

Why not tiktoken (measured): tiktoken starts from bytes and merges any adjacent pair whose
concatenation is a token, in the order of that token's rank; SentencePiece BPE starts from
characters and merges only the listed pairs, in list order. With ranks remapped so that
characters (and their partial UTF-8 prefixes) form first, tiktoken matched the reference on the
test tokenizer (0 mismatches in 1,000 random strings and 4,275 strings of its own tokens), but it
is not exact in general: with the merges [b c], [a b], [ab c] the reference encodes "abc" as
a + bc, since a + bc is not a listed merge, and tiktoken as abc. Nor can it write <unk>. This BPE
is the reference's algorithm, so it is exact by construction.
"""
import heapq
import json
import re

from weights.checkpoint import CheckpointError

SPACE = "\u2581"  # SentencePiece's space marker "▁"
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def is_sentencepiece_bpe(spec: dict) -> bool:
    """Is this tokenizer.json a SentencePiece-style BPE: byte fallback, or spaces as "▁" (a
    Metaspace pre-tokenizer, or a normalizer that writes "▁")?"""
    model = spec.get("model", {})
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return model.get("type") == "BPE" and (bool(model.get("byte_fallback")) or SPACE in text
                                           or '"Metaspace"' in text)


class SentencePieceBPE:
    """encode/decode of one SentencePiece-style tokenizer.json. `n_vocab`, `decode` and
    `encode_single_token` match tiktoken's Encoding, so text.tokenizer.Tokenizer runs on either."""

    def __init__(self, spec: dict, path):
        self.path = path
        model = spec["model"]
        check_model(model, path)
        self.vocab = dict(model["vocab"])
        self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        check_added_tokens(spec.get("added_tokens", []), path)
        self.id_to_token = {i: t for t, i in self.vocab.items()} | {i: t for t, i in self.added.items()}
        self.n_vocab = max(self.id_to_token) + 1
        self.merges = merge_table(model["merges"], self.vocab, path)
        self.byte_fallback, self.fuse_unk = bool(model.get("byte_fallback")), model.get("fuse_unk")
        self.ignore_merges = bool(model.get("ignore_merges"))
        self.unk_id = self.vocab.get(model.get("unk_token")) if model.get("unk_token") else None
        self.bytes = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self.normalizer = normalizer_steps(spec.get("normalizer"), path)
        self.metaspace = metaspace_settings(spec.get("pre_tokenizer"), path)
        self.decoders = decoder_steps(spec.get("decoder"), path)

    def encode_single_token(self, token: bytes) -> int:
        return self.vocab[token.decode("utf-8")]

    def encode(self, text: str, allow_special: bool = False, continuing: bool = False) -> list[int]:
        """Token ids, as the reference encodes text without its post-processor. Added tokens
        that are not special always split the text, special ones only when allow_special.
        continuing: the text continues earlier text, so its first piece gets no "▁" in front."""
        names = [t for t in self.added if allow_special or t not in self.special]
        pieces = split_on(text, names)
        ids = []
        for k, piece in enumerate(pieces):
            if piece in names:
                ids.append(self.added[piece])
            elif piece:
                first = k == 0 and not continuing
                for word in self.words(piece, prepend=not (k == 0 and continuing), first=first):
                    ids += self.bpe(word)
        return ids

    def words(self, piece: str, prepend: bool, first: bool) -> list[str]:
        """The normalizer, then the Metaspace pre-tokenizer (when the file has one)."""
        for kind, arg in self.normalizer:
            piece = (arg + piece if prepend and piece else piece) if kind == "prepend" \
                else piece.replace(*arg)
        if self.metaspace is None:
            return [piece]
        replacement, scheme, split = self.metaspace
        piece = piece.replace(" ", replacement)
        if (scheme == "always" and prepend or scheme == "first" and first) \
                and not piece.startswith(replacement):
            piece = replacement + piece
        if not split:
            return [piece]
        return [w for w in re.split(f"(?={re.escape(replacement)})", piece) if w]

    def symbols(self, word: str) -> list[int]:
        """The word's starting symbols: characters, else their bytes (<0xNN>), else <unk>
        (consecutive unknown characters fused into one when the file says fuse_unk)."""
        ids, unknown = [], False
        for c in word:
            fused = unknown and self.fuse_unk
            unknown = False
            if c in self.vocab:
                ids.append(self.vocab[c])
            elif self.byte_fallback and all(self.bytes[b] is not None for b in c.encode()):
                ids += [self.bytes[b] for b in c.encode()]
            elif self.unk_id is None:
                raise CheckpointError(f"{self.path}: {c!r} is not in the vocabulary and there "
                                      "is no unk_token")
            else:
                ids += [] if fused else [self.unk_id]
                unknown = True
        return ids

    def bpe(self, word: str) -> list[int]:
        """Merge the lowest-ranked listed pair, leftmost first, until none is left; a linked list
        of symbols and a heap of candidate merges that are checked when popped."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids = self.symbols(word)
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(*self.merges[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in self.merges]
        heapq.heapify(heap)
        while heap:
            rank, new_id, i = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j >= n or self.merges.get((ids[i], ids[j])) != (rank, new_id):
                continue
            ids[i], ids[j] = new_id, None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a >= 0 and b < n and (ids[a], ids[b]) in self.merges:
                    heapq.heappush(heap, (*self.merges[ids[a], ids[b]], a))
        return [t for t in ids if t is not None]

    def decode(self, ids, errors: str = "replace") -> str:
        """The file's decoder chain over the ids' tokens (ids outside the vocabulary are
        skipped, as the reference does). Bytes that are not UTF-8 become U+FFFD, one per byte."""
        tokens = [self.id_to_token[i] for i in ids if i in self.id_to_token]
        for kind, arg in self.decoders:
            tokens = DECODERS[kind](tokens, arg)
        return "".join(tokens)


def check_model(model: dict, path):
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: model {model.get('type')} is not a BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise CheckpointError(f"{path}: unsupported BPE option {key}={model[key]!r}")


def check_added_tokens(added: list[dict], path):
    for t in added:
        flags = [k for k in ("normalized", "lstrip", "rstrip", "single_word") if t.get(k)]
        if flags:
            raise CheckpointError(f"{path}: added token {t['content']!r} has {', '.join(flags)}"
                                  " set; only plain added tokens are supported")


def merge_table(merges: list, vocab: dict, path) -> dict[tuple[int, int], tuple[int, int]]:
    """{(left id, right id): (rank, merged id)} from merges as "a b" strings or [a, b] pairs."""
    table = {}
    for rank, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        try:
            left, right = pair
            table[vocab[left], vocab[right]] = (rank, vocab[left + right])
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: merge {merge!r} is not two vocabulary tokens whose "
                                  "concatenation is one") from None
    return table


def split_on(text: str, tokens: list[str]) -> list[str]:
    """text cut around every occurrence of the tokens (kept as pieces), leftmost-longest."""
    if not tokens:
        return [text]
    pattern = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.split(f"({pattern})", text)


def normalizer_steps(spec: dict | None, path) -> list[tuple]:
    """[("prepend", text) or ("replace", (old, new))] from a Prepend / Replace (Sequence)."""
    steps = spec.get("normalizers", []) if spec and spec.get("type") == "Sequence" else \
        [spec] if spec else []
    out = []
    for step in steps:
        if step.get("type") == "Prepend":
            out.append(("prepend", step["prepend"]))
        elif step.get("type") == "Replace" and "String" in step.get("pattern", {}):
            out.append(("replace", (step["pattern"]["String"], step["content"])))
        else:
            raise CheckpointError(f"{path}: unsupported normalizer {step} (supported: Prepend, "
                                  "Replace of a string, or a Sequence of them)")
    return out


def metaspace_settings(spec: dict | None, path) -> tuple[str, str, bool] | None:
    """(replacement, prepend scheme, split) of a Metaspace pre-tokenizer; None for none. Older
    files say add_prefix_space (true = prepend always) instead of prepend_scheme."""
    if spec is None:
        return None
    if spec.get("type") != "Metaspace":
        raise CheckpointError(f"{path}: unsupported pre_tokenizer {spec} for a SentencePiece BPE "
                              "(supported: none, Metaspace)")
    scheme = spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True) else "never")
    return spec.get("replacement", SPACE), scheme, spec.get("split", True)


def decoder_steps(spec: dict | None, path) -> list[tuple]:
    """[(kind, settings)] of the decoder chain; each kind is a key of DECODERS."""
    steps = spec.get("decoders", []) if spec and spec.get("type") == "Sequence" else \
        [spec] if spec else []
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and "String" in step.get("pattern", {}):
            out.append((kind, (step["pattern"]["String"], step["content"])))
        elif kind == "Strip":
            out.append((kind, (step["content"], step["start"], step["stop"])))
        elif kind == "Metaspace":
            out.append((kind, metaspace_settings({**step, "split": False}, path)))
        elif kind in ("ByteFallback", "Fuse"):
            out.append((kind, None))
        else:
            raise CheckpointError(f"{path}: unsupported decoder {step} (supported: Replace, "
                                  "ByteFallback, Fuse, Strip, Metaspace)")
    return out


def byte_fallback(tokens: list[str], _) -> list[str]:
    """Runs of <0xNN> tokens become their UTF-8 text, or one U+FFFD per byte if not UTF-8."""
    out, run = [], bytearray()
    for token in tokens + [None]:
        found = BYTE_TOKEN.fullmatch(token) if token is not None else None
        if found:
            run.append(int(found.group(1), 16))
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = bytearray()
        if token is not None:
            out.append(token)
    return out


def strip(tokens: list[str], settings) -> list[str]:
    """Each token loses up to `start` leading and `stop` trailing copies of `content`."""
    content, start, stop = settings
    out = []
    for token in tokens:
        lead = len(token) - len(token.lstrip(content))
        trail = len(token) - len(token.rstrip(content))
        out.append(token[min(lead, start):len(token) - min(trail, stop)])
    return out


def metaspace_decode(tokens: list[str], settings) -> list[str]:
    """"▁" becomes a space; in the first token it is dropped (unless the scheme is never)."""
    replacement, scheme, _ = settings
    return [t.replace(replacement, "" if i == 0 and scheme != "never" else " ")
            for i, t in enumerate(tokens)]


DECODERS = {
    "Replace": lambda tokens, arg: [t.replace(*arg) for t in tokens],
    "ByteFallback": byte_fallback,
    "Fuse": lambda tokens, _: ["".join(tokens)],
    "Strip": strip,
    "Metaspace": metaspace_decode,
}
