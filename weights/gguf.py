"""
A small reader for GGUF, llama.cpp's single-file model format, and numpy dequantisers for the
tensor types a small model file uses (F32, F16, Q8_0, Q4_1).

Layout (little-endian, version 2 and 3, as in the public GGUF spec of ggml):
    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:     key (string) | value type u32 | value   (arrays: element type u32, count u64, items)
    tensor infos: name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    padding to `general.alignment` (default 32), then the tensor data; offsets count from there.
Strings are a u64 byte length followed by UTF-8 bytes. Dims are listed fastest-varying first,
so a torch/numpy shape is the reversed list.
"""
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types -> struct format (8 = string, 9 = array are handled separately)
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9

# ggml tensor types -> (name, elements per block, bytes per block)
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
TENSOR_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_1: ("Q4_1", 32, 20), Q8_0: ("Q8_0", 32, 34)}


class GGUFError(ValueError):
    """The file is not GGUF, is truncated, or uses a tensor type we cannot dequantise."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple      # torch order (slowest-varying first): the GGUF dims reversed
    ggml_type: int
    offset: int       # absolute byte offset of the tensor's data in the file

    @property
    def n_bytes(self) -> int:
        _, block, block_bytes = TENSOR_TYPES[self.ggml_type]
        return int(np.prod(self.shape)) // block * block_bytes


class _Cursor:
    """Sequential little-endian reads over a bytes-like buffer."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated (wanted {n} bytes at offset {self.pos})")
        chunk = self.buf[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            return [self.value(item_type) for _ in range(count)]
        if value_type not in SCALAR_FORMATS:
            raise GGUFError(f"{self.path}: unknown metadata value type {value_type} at {self.pos}")
        return self.unpack(SCALAR_FORMATS[value_type])


class GGUFFile:
    """Metadata (dict), tensor infos (name -> TensorInfo) and dequantised tensors of one file.
    The file is memory-mapped; `tensor(name)` reads and dequantises one tensor to fp32."""

    def __init__(self, path):
        self.path = Path(path)
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self.data), self.path)
        if bytes(cur.take(4)) != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            raw.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors = {name: TensorInfo(name, shape, ggml_type, data_start + offset)
                        for name, shape, ggml_type, offset in raw}
        for info in self.tensors.values():
            if info.ggml_type not in TENSOR_TYPES:
                raise GGUFError(f"{self.path}: tensor {info.name} has ggml type {info.ggml_type}; "
                                f"supported: {sorted(v[0] for v in TENSOR_TYPES.values())}")
            if info.offset + info.n_bytes > len(self.data):
                raise GGUFError(f"{self.path}: truncated (tensor {info.name} ends past the file)")

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as a float32 array in torch order."""
        info = self.tensors[name]
        raw = self.data[info.offset:info.offset + info.n_bytes]
        return dequantize(raw, info.ggml_type).reshape(info.shape)


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """uint8 bytes of one tensor -> flat float32 values."""
    raw = np.asarray(raw, dtype=np.uint8)
    if ggml_type == F32:
        return raw.view("<f4").astype(np.float32)
    if ggml_type == F16:
        return raw.view("<f2").astype(np.float32)
    if ggml_type == Q8_0:
        return dequantize_q8_0(raw)
    if ggml_type == Q4_1:
        return dequantize_q4_1(raw)
    raise GGUFError(f"no dequantiser for ggml type {ggml_type}")


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Blocks of 34 bytes: fp16 scale d, then 32 int8 q; value = d * q."""
    blocks = raw.reshape(-1, 34)                                   # (nb, 34)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)       # (nb, 1)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)            # (nb, 32)
    return (d * q).reshape(-1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Blocks of 20 bytes: fp16 scale d, fp16 min m, then 16 bytes of 4-bit q (the low nibbles
    are elements 0-15, the high nibbles elements 16-31); value = d * q + m."""
    blocks = raw.reshape(-1, 20)                                   # (nb, 20)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)      # (nb, 1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)      # (nb, 1)
    packed = blocks[:, 4:]                                         # (nb, 16)
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # (nb, 32)
    return (d * q + m).reshape(-1)
