"""
Image preprocessing for the vision towers, equal to transformers' image processors (PIL
backend): CLIPImageProcessor (resize the short side, centre crop), SiglipImageProcessor and
BlipImageProcessor (BLIP-2 / InstructBLIP: resize to a square), plus LLaVA's pad-to-square.
Read from and written as a hub preprocessor_config.json. Also the random views that training
sees of an image (turned, random_view).
"""
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Preprocessing mode -> the transformers image processor it equals (image_processor_type).
MODES = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor", "blip": "BlipImageProcessor"}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' processors do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square of colour `fill` (an RGB tuple
    of ints; LLaVA uses the processor's mean colour)."""
    w, h = image.size
    if w == h:
        return image
    square = Image.new(image.mode, (max(w, h), max(w, h)), tuple(fill))
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


@dataclass
class ImageProcessor:
    """CLIP / SigLIP / BLIP preprocessing, equal to transformers' CLIPImageProcessor /
    SiglipImageProcessor / BlipImageProcessor (PIL backend). mode "clip": resize the shortest side
    to `size` (bicubic, long side int(size * long / short)), centre crop `crop_size`; modes
    "siglip" and "blip" (the same steps; BLIP keeps CLIP's mean and std): resize to size x size,
    no crop. Then x / 255 and (x - mean) / std per channel. pad_to_square (LLaVA's
    image_aspect_ratio="pad") first pads to a square of the mean colour."""
    size: int = 224
    crop_size: int = 224
    resample: int = Image.Resampling.BICUBIC
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    mode: str = "clip"
    pad_to_square: bool = False
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode == "clip" and self.crop_size > self.size:
            raise ValueError(f"crop_size {self.crop_size} larger than the resized short side {self.size}")

    @classmethod
    def clip(cls, image_size: int, **kw) -> "ImageProcessor":
        return cls(size=image_size, crop_size=image_size, **kw)

    @classmethod
    def siglip(cls, image_size: int, **kw) -> "ImageProcessor":
        return cls(size=image_size, crop_size=image_size, mean=(0.5,) * 3, std=(0.5,) * 3,
                   mode="siglip", **kw)

    @classmethod
    def blip(cls, image_size: int, **kw) -> "ImageProcessor":
        return cls(size=image_size, crop_size=image_size, mode="blip", **kw)

    @classmethod
    def from_hf(cls, hf: dict, pad_to_square: bool | None = None) -> "ImageProcessor":
        """A preprocessor_config.json dict (CLIP: size {"shortest_edge"} or an int, crop_size;
        SigLIP, BLIP: size {"height", "width"}). Steps it switches off that we always run are errors."""
        kind = hf.get("image_processor_type", hf.get("feature_extractor_type", ""))
        size = hf.get("size", 224)
        mode = "blip" if kind.startswith("Blip") else "siglip" if kind.startswith("Siglip") or (
            isinstance(size, dict) and "height" in size) else "clip"
        expected = dict(do_resize=True, do_rescale=True, do_normalize=True, do_center_crop=mode == "clip")
        for flag, value in expected.items():
            if hf.get(flag, value) != value:
                raise ValueError(f"unsupported preprocessor config: {flag}={hf[flag]} ({mode} mode)")
        size = _square_size(size)
        pad = hf.get("pad_to_square", False) if pad_to_square is None else pad_to_square
        return cls(size=size, crop_size=_square_size(hf.get("crop_size", size)),
                   resample=hf.get("resample", Image.Resampling.BICUBIC),
                   mean=tuple(hf.get("image_mean", OPENAI_CLIP_MEAN)),
                   std=tuple(hf.get("image_std", OPENAI_CLIP_STD)), mode=mode, pad_to_square=pad,
                   rescale_factor=hf.get("rescale_factor", 1 / 255))

    def to_hf(self) -> dict:
        clip = self.mode == "clip"
        hf = dict(image_processor_type=MODES[self.mode],
                  do_resize=True, do_center_crop=clip, do_rescale=True, do_normalize=True,
                  do_convert_rgb=True, resample=int(self.resample), rescale_factor=self.rescale_factor,
                  image_mean=list(self.mean), image_std=list(self.std), pad_to_square=self.pad_to_square,
                  size={"shortest_edge": self.size} if clip else {"height": self.size, "width": self.size})
        if clip:
            hf["crop_size"] = {"height": self.crop_size, "width": self.crop_size}
        return hf

    def resize(self, image: Image.Image) -> Image.Image:
        if self.mode != "clip":
            return image.resize((self.size, self.size), resample=self.resample)
        w, h = image.size
        short, long = min(w, h), max(w, h)
        long = int(self.size * long / short)
        image = image.resize((self.size, long) if w <= h else (long, self.size), resample=self.resample)
        top, left = (image.height - self.crop_size) // 2, (image.width - self.crop_size) // 2
        return image.crop((left, top, left + self.crop_size, top + self.crop_size))

    def __call__(self, images: list) -> torch.Tensor:
        """list of PIL images -> (B, 3, crop, crop) float32."""
        mean, std = np.array(self.mean, np.float32), np.array(self.std, np.float32)
        out = []
        for image in images:
            image = to_rgb(image)
            if self.pad_to_square:
                image = pad_to_square(image, tuple(int(m * 255) for m in self.mean))
            x = np.asarray(self.resize(image)).astype(np.float64) * self.rescale_factor
            out.append((x.astype(np.float32) - mean) / std)                # (H, W, 3)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def turned(image: Image.Image, rng: random.Random, max_degrees: float = 180.0) -> Image.Image:
    """The image turned about its centre by an angle drawn from [-max_degrees, max_degrees]
    (rng; by default any angle), the uncovered corners filled with its background (the top-left
    pixel's colour). Ours: the views the offline tower trains on, so that it names shapes at
    any rotation (README, "Turned images")."""
    return image.rotate(rng.uniform(-max_degrees, max_degrees), fillcolor=image.getpixel((0, 0)),
                        resample=Image.Resampling.BILINEAR)


def random_view(image: Image.Image, rng: random.Random, max_degrees: float = 15.0,
                scale=(0.75, 1.1), max_shift: float = 0.1, tint: float = 0.5) -> Image.Image:
    """The image as another rendering might show it: in one of its 8 lossless orientations
    (mirrored and/or turned by a multiple of 90 degrees), rotated a little further (up to
    max_degrees either way), scaled, and shifted by up to max_shift of its size, on its own
    background (the top-left pixel's colour), which with probability `tint` becomes a random
    light colour (each channel 200..255, wider than easy-VQA's own 230..255). Ours, for
    robustness to renderings that training never saw (other sizes, positions, rotations,
    backgrounds); drawn from rng, so seeding it repeats the view. The small continuous rotation
    is a hedge, not a measured optimum: with arbitrary angles (and mirroring only), a 300-step
    stage 0 reached 42% caption top-1; arbitrary angles were not tried at 1,500 steps."""
    orientation = rng.randrange(8)
    if orientation:
        image = image.transpose(list(Image.Transpose)[orientation - 1])
    w, h = image.size
    angle, s = math.radians(rng.uniform(-max_degrees, max_degrees)), rng.uniform(*scale)
    cx, cy = w / 2 + rng.uniform(-max_shift, max_shift) * w, h / 2 + rng.uniform(-max_shift, max_shift) * h
    a, b = math.cos(angle) / s, math.sin(angle) / s
    # output pixel (x, y) reads input (a(x-cx) + b(y-cy) + w/2, -b(x-cx) + a(y-cy) + h/2)
    inverse = (a, b, w / 2 - a * cx - b * cy, -b, a, h / 2 + b * cx - a * cy)
    background = image.getpixel((0, 0))
    if rng.random() < tint:
        light = tuple(rng.randint(200, 255) for _ in range(3))
        pixels = np.asarray(image).copy()                                   # (H, W, 3)
        pixels[(np.abs(pixels.astype(int) - background).max(-1) <= 8)] = light
        image, background = Image.fromarray(pixels), light
    return image.transform(image.size, Image.Transform.AFFINE, inverse,
                           resample=Image.Resampling.BILINEAR, fillcolor=background)


def _square_size(size) -> int:
    """An int, or a size dict of one square side ({"shortest_edge"} or equal height and width)."""
    if isinstance(size, int):
        return size
    if "shortest_edge" in size:
        return size["shortest_edge"]
    if size.get("height") != size.get("width"):
        raise ValueError(f"only square sizes are supported, got {size}")
    return size["height"]
