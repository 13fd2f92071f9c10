"""
The one on-disk data format for every stage: LLaVA's conversation JSON (Liu et al., "Visual
Instruction Tuning", 2023; the layout of its llava_instruct / blip_laion_cc_sbu files). A file is
a list of rows

    {"id": "42", "image": "train/images/42.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "red"}, ...]}

with image paths relative to an image root folder. A row without "image" is text-only (as in
LLaVA-1.5's llava_v1_5_mix665k) and holds no <image>. Image-caption pairs (stage 0, retrieval)
are rows with one turn whose answer is the caption. Extra keys on a row (e.g. "type",
"options") are kept in Sample.extra. `turn_samples` splits multi-turn rows into one sample per
assistant turn, with the earlier turns as its history, for scoring.

Loading is strict: every malformed row is a DataError naming the file, row index, id and the
problem, or, with on_bad="skip", a recorded reason and a skipped row.
"""
import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

IMAGE = "<image>"


class DataError(ValueError):
    """A data file, row or image that cannot be used, with where and why."""


@dataclass
class Sample:
    id: str
    image: Path | None               # resolved, inside the image root, exists; None: text-only
    turns: list[tuple[str, str]]     # (prompt without <image>, answer)
    image_first: bool                # <image> stood before the first prompt's text
    extra: dict = field(default_factory=dict)  # the row's other keys, e.g. "type"


def load_conversations(json_path, image_root, on_bad="error") -> tuple[list[Sample], list[str]]:
    """Read and validate a conversation file. on_bad="error" raises on the first bad row;
    on_bad="skip" drops bad rows and returns their "id: reason" lines. Problems with the file
    itself (unreadable, not UTF-8, not JSON, not a list) always raise."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    json_path, root = Path(json_path), Path(image_root).resolve()
    if not root.is_dir():
        raise DataError(f"{json_path}: image root {root} is not a folder")
    try:
        rows = json.loads(json_path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise DataError(f"{json_path}: cannot read ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{json_path}: not UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: invalid JSON ({e})") from e
    if not isinstance(rows, list):
        raise DataError(f"{json_path}: expected a list of rows, got {type(rows).__name__}")
    resolve = functools.cache(lambda relative: resolve_image(relative, root))  # rows share images
    samples, skipped = [], []
    for index, row in enumerate(rows):
        row_id = row.get("id") if isinstance(row, dict) else None
        try:
            samples.append(parse_row(row, resolve))
        except DataError as e:
            if on_bad == "error":
                raise DataError(f"{json_path}: row {index} (id {row_id!r}): {e}") from None
            skipped.append(f"{row_id if row_id is not None else f'row {index}'}: {e}")
    return samples, skipped


def parse_row(row, resolve: Callable[[str], Path]) -> Sample:
    """One validated row; `resolve` turns its image path into a checked absolute path."""
    if not isinstance(row, dict):
        raise DataError(f"row is a {type(row).__name__}, not an object")
    missing = [k for k in ("id", "conversations") if k not in row]
    if missing:
        raise DataError(f"missing field(s) {', '.join(missing)}")
    row_id, image, conversations = row["id"], row.get("image"), row["conversations"]
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise DataError(f"id must be a string or an integer, got {type(row_id).__name__}")
    if "image" in row and (not isinstance(image, str) or not image):
        raise DataError("image must be a non-empty string")
    if not isinstance(conversations, list) or not conversations:
        raise DataError("conversations must be a non-empty list")
    for i, message in enumerate(conversations):
        if not (isinstance(message, dict) and isinstance(message.get("from"), str)
                and isinstance(message.get("value"), str)):
            raise DataError(f"conversations[{i}] must be an object with string 'from' and 'value'")
    speakers = [m["from"] for m in conversations]
    if len(speakers) % 2 or speakers != ["human", "gpt"] * (len(speakers) // 2):
        raise DataError(f"turns must alternate human, gpt, ... and end with gpt; got {speakers}")
    values = [m["value"] for m in conversations]
    if image is None and any(IMAGE in v for v in values):
        raise DataError(f"a row without an image holds {IMAGE}")
    if image is not None and values[0].count(IMAGE) != 1:
        raise DataError(f"the first human turn must hold exactly one {IMAGE}, "
                        f"found {values[0].count(IMAGE)}")
    if any(IMAGE in v for v in values[1:]):
        raise DataError(f"{IMAGE} may appear only in the first human turn")
    if any(not answer.strip() for answer in values[1::2]):
        raise DataError("empty answer")
    before, after = values[0].split(IMAGE) if image is not None else ("", values[0])
    first = (before.removesuffix("\n") + after.removeprefix("\n")).strip()
    prompts = [first] + [v.strip() for v in values[2::2]]
    turns = list(zip(prompts, [a.strip() for a in values[1::2]]))
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "conversations")}
    return Sample(str(row_id), None if image is None else resolve(image), turns,
                  image is not None and not before.strip(), extra)


def turn_samples(samples: list[Sample]) -> list[Sample]:
    """One sample per assistant turn: a multi-turn row's turn k becomes a sample whose turns
    are the row's first k+1 (the earlier ones its teacher-forced history, the last the one to
    answer), its id "<id>/<k>" and extra["turn"] = k. Single-turn rows stay as they are."""
    return [s if len(s.turns) == 1 else
            Sample(f"{s.id}/{k}", s.image, s.turns[:k + 1], s.image_first, s.extra | {"turn": k})
            for s in samples for k in range(len(s.turns))]


def resolve_image(relative: str, root: Path) -> Path:
    """The image's real path (root already resolved), refused if absolute, escaping the root (.., symlinks) or missing."""
    if Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise DataError(f"image path {relative!r} is absolute; it must be relative to the image root")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"image path {relative!r} escapes the image root {root}")
    if not path.is_file():
        raise DataError(f"image file {path} is missing")
    return path


def load_image(path) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB. Unreadable, truncated or over-large
    files (Pillow's Image.MAX_IMAGE_PIXELS decompression-bomb limit, warning or error) are a
    DataError naming the file. Conversions: transparent images (RGBA, LA, P or L/RGB with a
    transparency key) are composited on white, so transparent pixels do not turn into whatever
    colour they happened to hold; 16-bit greyscale is scaled to 0..255 (v / 257, rounded);
    everything else (L, CMYK, YCbCr, ...) goes through Pillow's convert("RGB")."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: cannot use image ({type(e).__name__}: {e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNG data in a 32-bit container)
        wide = np.asarray(img).astype(np.float32).clip(0, 65535)
        return Image.fromarray((wide / 257).round().astype(np.uint8)).convert("RGB")
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def captions(samples: list[Sample]) -> list[tuple[Path, str]]:
    """(image, caption) pairs for stage 0 and retrieval: each sample's first answer."""
    return [(s.image, s.turns[0][1]) for s in samples]
