"""
Held-out renderings: easy-vqa's questions about shapes drawn here, unlike easy-vqa's own 64 x 64
images: other image sizes (48, 96 or 160 pixels, which the processor resizes), shape sizes from
small to large, positions anywhere, any rotation, backgrounds easy-vqa never uses (plain
colours darker than its own, gradients, pixel noise), and smooth edges (drawn at 4x, then
downsampled). Nothing trains on them: they test whether a model knows colour and shape, or
only easy-vqa's rendering of them. Ours: the maintainers' own robustness set (other sizes,
positions, rotations, backgrounds) is not available here, so this is our stand-in for it.

Each image gets one colour question, one shape question, and two yes/no questions from one
easy-vqa yes/no template, one naming what the image shows and one naming something else. Every
template is so answered "yes" as often as "no", and a question-only model gets about 50% of
the yes/no rows.

    python -m data.renders                                           # writes the files once
    python eval.py --checkpoint runs/crome/stage2 --kind renders     # prepares them if needed
"""
import argparse
import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.easyvqa import (COLORS, SHAPES, package_root, question_template, question_type,
                          read_split, row)
from weights.checkpoint import save_json
from weights.offline import cache_dir

# easy-vqa's colours, as its images have them (HTML's named colours; its "green" is HTML's lime)
COLOR_RGB = {"black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42),
             "gray": (128, 128, 128), "green": (0, 255, 0), "red": (255, 0, 0),
             "teal": (0, 128, 128), "yellow": (255, 255, 0)}
IMAGE_SIZES = (48, 96, 160)
SUPERSAMPLE = 4


def templates(root: Path) -> dict[str, list[str]]:
    """easy-vqa's test-split question templates ('is there not a {color} shape?') by answer
    type: color, shape, yes/no."""
    by_image, _ = read_split(root, "test")
    found = defaultdict(set)
    for questions in by_image.values():
        for _, text, answer in questions:
            found[question_type(answer)].add(question_template(text))
    return {kind: sorted(texts) for kind, texts in found.items()}


def background(size: int, rng: random.Random) -> np.ndarray:
    """(size, size, 3) floats: a plain colour (each channel 170..255; easy-vqa's are 230..255)
    or a gradient between two such colours in a random direction."""
    first = np.array([rng.uniform(170, 255) for _ in range(3)])
    if rng.random() < 0.5:
        return np.broadcast_to(first, (size, size, 3)).copy()
    second = np.array([rng.uniform(170, 255) for _ in range(3)])
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    t = (x * math.cos(angle) + y * math.sin(angle))
    t = (t - t.min()) / (t.max() - t.min())                              # (size, size) in 0..1
    return first + t[..., None] * (second - first)


def outline(shape: str, cx: float, cy: float, radius: float, angle: float, rng: random.Random):
    """The shape's bounding circle is (cx, cy, radius): a circle, an equilateral triangle, or a
    rectangle of random aspect, turned by `angle`. Returns a box (circle) or a polygon."""
    if shape == "circle":
        return [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "triangle":
        corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
    else:
        half = math.atan(rng.uniform(0.5, 1.0))        # the half-angle the short side spans
        corners = [angle + half, angle + math.pi - half, angle + math.pi + half, angle - half]
    return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]


def draw(shape: str, color: str, rng: random.Random) -> Image.Image:
    """One image of one shape in easy-vqa's colour, rendered as described in the module."""
    size = rng.choice(IMAGE_SIZES)
    big = size * SUPERSAMPLE
    radius = rng.uniform(0.15, 0.45) * big
    cx, cy = rng.uniform(radius, big - radius), rng.uniform(radius, big - radius)
    image = Image.fromarray(background(big, rng).astype(np.uint8))
    box_or_polygon = outline(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi), rng)
    pen = ImageDraw.Draw(image)
    (pen.ellipse if shape == "circle" else pen.polygon)(box_or_polygon, fill=COLOR_RGB[color])
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:   # pixel noise
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 8, (size, size, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    return image


def fill(template: str, color: str, shape: str) -> str:
    return template.replace("{color}", color).replace("{shape}", shape)


def yesno_pair(template: str, color: str, shape: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) twice from one yes/no template: naming the image's colour and shape,
    then with one named attribute swapped for another. A negated template ('is there not a
    red shape?', 'is no circle present?') answers the opposite."""
    negated = bool(set(template.rstrip("?").split()) & {"not", "no"})
    named = [w for w in ("{color}", "{shape}") if w in template]
    if rng.choice(named) == "{color}":
        other = (rng.choice([c for c in COLORS if c != color]), shape)
    else:
        other = (color, rng.choice([s for s in SHAPES if s != shape]))
    return [(fill(template, color, shape), "no" if negated else "yes"),
            (fill(template, *other), "yes" if negated else "no")]


def prepare_renders(out_dir=None, n_images: int = 300, seed: int = 0) -> dict[str, Path]:
    """Draw the images and write renders_test.json (the same files on every run); returns
    {"renders_test": path, "image_root": folder}."""
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "easy-vqa-renders"
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    kinds, rng, rows = templates(package_root()), random.Random(seed), []
    for i in range(n_images):
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        image = f"images/{i}.png"
        draw(shape, color, rng).save(out_dir / image)
        questions = [(fill(rng.choice(kinds["color"]), color, shape), color),
                     (fill(rng.choice(kinds["shape"]), color, shape), shape),
                     *yesno_pair(rng.choice(kinds["yes/no"]), color, shape, rng)]
        rows += [row(f"render-{i}-q{k}", image, q, a, type=question_type(a))
                 for k, (q, a) in enumerate(questions)]
    path = out_dir / "renders_test.json"
    save_json(rows, path)
    print(f"{path}: {len(rows)} rows on {n_images} images")
    return {"renders_test": path, "image_root": out_dir}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the held-out renderings and their questions.")
    parser.add_argument("--out", help="output folder (default: <cache>/easy-vqa-renders)")
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    prepare_renders(args.out, args.images)
