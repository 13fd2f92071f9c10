"""
Checkpoint plumbing shared by every loader and by training: find a checkpoint (local folder or
hub repo id), read its safetensors (single file or sharded), map hub key names onto ours
strictly, and write files atomically.

Strictness is the point: a missing, unexpected or wrongly shaped tensor is a CheckpointError
that names it, never a silent partial load. Weights are only ever read from safetensors.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match the model it is loaded into."""


def resolve_checkpoint(name_or_path, allow_patterns=("config.json", "*.safetensors",
                                                     "model.safetensors.index.json")) -> Path:
    """A local folder as is; anything else is a hub repo id, fetched with huggingface_hub
    (only the files matching allow_patterns; HF_HUB_OFFLINE=1 is honoured by the hub client)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder, got a file")
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise CheckpointError(f"{name_or_path}: no such folder, and not a hub repo id (owner/name)")
    try:
        return Path(huggingface_hub.snapshot_download(str(name_or_path), allow_patterns=list(allow_patterns)))
    except Exception as e:  # network, auth, offline mode: say which repo failed and why
        raise CheckpointError(f"could not fetch {name_or_path} from the hub: {e}") from e


def read_config(folder: Path, name="config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); "
                              "is it truncated or corrupt?") from e


def read_safetensors_metadata(path: Path) -> dict:
    """The string metadata in a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); "
                              "is it truncated or corrupt?") from e


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, or the shards listed in
    model.safetensors.index.json, or a single other *.safetensors file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_config(folder, index.name).get("weight_map", {})
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors_file(folder / shard))
        return state
    if (folder / "model.safetensors").is_file():
        return read_safetensors_file(folder / "model.safetensors")
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{folder}: expected model.safetensors (or an index of shards), "
                              f"found {[f.name for f in files] or 'no safetensors file'}")
    return read_safetensors_file(files[0])


Transform = Callable[[torch.Tensor], torch.Tensor]


def remap(hub_state: dict, mapping: dict, ignore: Callable[[str], bool] = lambda k: False,
          source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename hub tensors to ours. mapping: our_key -> hub_key, or our_key -> (hub_key, fn)
    where fn transforms the tensor (e.g. GPT-2's Conv1D transpose), or our_key ->
    ([hub_key, ...], fn) where fn(*tensors) builds one tensor (e.g. a fused q/k/v weight).
    Every hub key must be either mapped or explicitly ignored by the `ignore` rule; anything
    else is an error."""
    ours, used = {}, set()
    missing = []
    for our_key, spec in mapping.items():
        hub_keys, fn = spec if isinstance(spec, tuple) else (spec, None)
        hub_keys = [hub_keys] if isinstance(hub_keys, str) else list(hub_keys)
        absent = [k for k in hub_keys if k not in hub_state]
        if absent:
            missing.extend(absent)
            continue
        used.update(hub_keys)
        tensors = [hub_state[k] for k in hub_keys]
        ours[our_key] = fn(*tensors) if fn else tensors[0]
    unexpected = sorted(k for k in hub_state if k not in used and not ignore(k))
    if missing or unexpected:
        raise CheckpointError(f"{source}: " + "; ".join(
            part for part in (_list("missing tensors", missing),
                              _list("unexpected tensors", unexpected)) if part))
    return ours


def load_strict(module: torch.nn.Module, state: dict, source: str = "checkpoint",
                keys=None) -> None:
    """Copy `state` into `module` after checking the key sets and every shape. `keys` limits
    the comparison to a subset of the module's state (e.g. trainable weights only)."""
    own = module.state_dict()
    expected = set(own) if keys is None else set(keys)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    misshaped = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                       for k in expected & set(state) if state[k].shape != own[k].shape)
    problems = [p for p in (_list("missing tensors", missing), _list("unexpected tensors", unexpected),
                            _list("wrongly shaped tensors", misshaped)) if p]
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def _list(what, names, limit=8):
    if not names:
        return ""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{what}: {', '.join(names[:limit])}{more}"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write a file through `write(tmp_path)` then rename it into place, so a crash or a full
    disk mid-write leaves any previous file at `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    # clone: tied weights (one tensor, two names) would share memory, which safetensors refuses
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json(obj, path: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
