"""Pictures of tabular data: rows of examples as heat maps, standardised per feature, under the
features' names and above a colour bar.

One colour map over raw values lets the columns in the hundreds drown the rest (breast cancer's
areas against its smoothness): each feature is shown instead in standard deviations from its
training mean (the pipeline's own statistics for Gaussian runs), clipped at +-3. Data in [0, 1]
(Bernoulli runs) share one scale already and are shown as they are. Tensors in, images out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .plot import font

CLIP = 3.0  # standard deviations: the ends of the colour bar
CELL = 14  # pixels per value
GAP = 5  # white pixels between blocks of rows
# A diverging map (blue below the mean, white at it, red above), as ColorBrewer's RdBu.
ANCHORS = np.array([[33, 102, 172], [103, 169, 207], [247, 247, 247], [239, 138, 98],
                    [178, 24, 43]], dtype=np.float64)


@dataclass
class FeatureScale:
    """How a row of D values is shown: names (D,) and, to standardise, mean and std (D,)."""

    names: list[str]
    mean: Tensor | None = None  # (D,) training mean, data units
    std: Tensor | None = None  # (D,)

    @property
    def standardised(self) -> bool:
        return self.mean is not None

    def values(self, x: Tensor) -> np.ndarray:
        """x (N, ...) in data units -> (N, D) in the colour bar's units."""
        flat = x.detach().float().reshape(len(x), -1).cpu()  # (N, D)
        if self.standardised:
            flat = (flat - self.mean.reshape(1, -1)) / self.std.reshape(1, -1)
        return flat.numpy()

    @property
    def limits(self) -> tuple[float, float]:
        return (-CLIP, CLIP) if self.standardised else (0.0, 1.0)

    @property
    def caption(self) -> str:
        if self.standardised:
            return (f"standard deviations from each feature's training mean (clipped at "
                    f"+-{CLIP:g})")
        return "value (data in [0, 1], one scale for all features)"


def feature_scale(shape: tuple[int, ...], names: list[str] | None, pipeline) -> FeatureScale | None:
    """The scale of a run's non-image data (None for images): the CSV header's names (else
    x0, x1, ...) and the training statistics of a standardising pipeline (else the values as
    they are, which are then in [0, 1])."""
    if len(shape) == 3 and shape[0] in (1, 3):
        return None
    dims = math.prod(shape)
    names = list(names) if names and len(names) == dims else [f"x{i}" for i in range(dims)]
    if getattr(pipeline, "mode", None) == "standardize":
        return FeatureScale(names, pipeline.mean.reshape(-1).cpu().float(),
                            pipeline.std.reshape(-1).cpu().float())
    return FeatureScale(names)


def colours(values: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    """(N, D) values -> (N, D, 3) uint8 colours of the diverging map over limits."""
    lo, hi = limits
    t = np.clip((values - lo) / (hi - lo), 0.0, 1.0) * (len(ANCHORS) - 1)  # (N, D)
    below = np.minimum(np.floor(t).astype(int), len(ANCHORS) - 2)
    frac = (t - below)[..., None]  # (N, D, 1)
    rgb = ANCHORS[below] * (1 - frac) + ANCHORS[below + 1] * frac  # (N, D, 3)
    return np.rint(rgb).astype(np.uint8)


def _rotated_text(text: str, size: int = 11) -> Image.Image:
    """The text turned to read upwards, on white."""
    label_font = font(size)
    width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=label_font)) + 4
    strip = Image.new("RGB", (width, size + 4), "white")
    ImageDraw.Draw(strip).text((2, 1), text, fill="#222222", font=label_font)
    return strip.rotate(90, expand=True)


def table_image(blocks: list[Tensor], scale: FeatureScale, labels: list[str] | None = None,
                colors: list[str] | None = None) -> Image.Image:
    """Blocks of rows (each (n_k, ...) in data units), a gap between blocks, a label left of
    each block (labels[k]), the feature names above the columns and a colour bar below."""
    label_font = font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = (max(int(measure.textlength(text, font=label_font)) for text in labels) + 12
            if labels else 4)
    names = [_rotated_text(name[:40]) for name in scale.names]
    top = max(n.height for n in names) + 4
    dims = len(scale.names)
    heights = [len(block) * CELL for block in blocks]
    body = sum(heights) + GAP * (len(blocks) - 1)
    bar_height = 62
    width = max(left + dims * CELL + 8, 340)
    canvas = Image.new("RGB", (width, top + body + bar_height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):  # names read upwards, each over its column
        canvas.paste(name, (left + j * CELL + (CELL - name.width) // 2, top - 2 - name.height))
    y = top
    for k, (block, height) in enumerate(zip(blocks, heights)):
        rgb = colours(scale.values(block), scale.limits)  # (n_k, D, 3)
        pixels = rgb.repeat(CELL, axis=0).repeat(CELL, axis=1)
        canvas.paste(Image.fromarray(pixels), (left, y))
        if labels:
            draw.text((6, y + height / 2 - 8), labels[k], font=label_font,
                      fill=(colors or ["black"] * len(labels))[k])
        y += height + GAP
    _colour_bar(canvas, draw, left, top + body + 10, scale)
    return canvas


def _colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, left: int, top: int,
                scale: FeatureScale) -> None:
    lo, hi = scale.limits
    length = 240
    ramp = colours(np.linspace(lo, hi, length)[None, :], scale.limits)  # (1, length, 3)
    canvas.paste(Image.fromarray(ramp.repeat(12, axis=0)), (left, top))
    tick_font = font(11)
    ticks = np.linspace(lo, hi, 7 if scale.standardised else 5)
    for value in ticks:
        x = left + (value - lo) / (hi - lo) * (length - 1)
        text = f"{value:+g}" if scale.standardised and value else f"{value:g}"
        draw.line([(x, top + 12), (x, top + 15)], fill="#444444")
        draw.text((x - draw.textlength(text, font=tick_font) / 2, top + 16), text,
                  fill="#444444", font=tick_font)
    draw.text((left, top + 32), scale.caption, fill="#222222", font=tick_font)
