"""Pictures of a VAE: tensors in, PIL images out (grids, reconstructions, training curves)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .plot import Chart, font

MIN_CELL = 56  # pixels: small images (8x8 digits) are enlarged to at least this, without blur


def is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def image_grid(images: Tensor, columns: int | None = None, pad: int = 2,
               background: int = 255) -> Image.Image:
    """A grid of images (N, C, H, W) with values in [0, 1]; C is 1 or 3."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, channels, height, width = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    zoom = max(1, math.ceil(MIN_CELL / max(height, width)))
    cell_h, cell_w = height * zoom, width * zoom
    canvas = np.full((rows * (cell_h + pad) + pad, columns * (cell_w + pad) + pad, 3),
                     background, dtype=np.uint8)
    pixels = (images * 255).round().to(torch.uint8).numpy()  # (N, C, H, W)
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=1)
    pixels = pixels.transpose(0, 2, 3, 1).repeat(zoom, axis=1).repeat(zoom, axis=2)  # (N, h, w, 3)
    for index in range(n):
        r, c = divmod(index, columns)
        top, left = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        canvas[top:top + cell_h, left:left + cell_w] = pixels[index]
    return Image.fromarray(canvas)


def vector_rows(vectors: Tensor, cell: int = 10) -> Image.Image:
    """Non-image data (N, D) as a heat map, one row per example (blue low, red high)."""
    values = vectors.detach().float().reshape(len(vectors), -1).cpu()
    lo, hi = float(values.min()), float(values.max())
    scaled = ((values - lo) / (hi - lo if hi > lo else 1.0)).numpy()  # (N, D) in [0, 1]
    rgb = np.stack([scaled, 1 - np.abs(2 * scaled - 1), 1 - scaled], axis=-1)
    pixels = (rgb * 255).astype(np.uint8).repeat(cell, axis=0).repeat(cell, axis=1)
    return Image.fromarray(pixels)


def examples_image(x: Tensor, columns: int | None = None) -> Image.Image:
    """Images as a grid, anything else as heat-map rows."""
    if is_image_shape(tuple(x.shape[1:])):
        return image_grid(x, columns)
    return vector_rows(x)


def class_rows_image(images: Tensor, names: list[str], pad: int = 2) -> Image.Image:
    """One row per class, its name at the left: images (len(names) * m, ...) class by class."""
    per_class = len(images) // len(names)
    if not is_image_shape(tuple(images.shape[1:])):
        grid = vector_rows(images)
    else:
        grid = image_grid(images, columns=per_class, pad=pad)
    label_font = font(13)
    measure = ImageDraw.Draw(grid)
    margin = int(max(measure.textlength(name, font=label_font) for name in names)) + 12
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = grid.height / len(names)
    for row, name in enumerate(names):
        draw.text((6, row * row_height + row_height / 2 - 8), name, fill="black", font=label_font)
    return canvas


def reconstruction_image(originals: Tensor, reconstructions: Tensor,
                         columns: int = 8) -> Image.Image:
    """Pairs of rows: inputs above their reconstructions."""
    rows = []
    for start in range(0, len(originals), columns):
        rows += [originals[start:start + columns], reconstructions[start:start + columns]]
    if is_image_shape(tuple(originals.shape[1:])):
        blank = torch.ones_like(originals[:1])
        padded = [torch.cat([r, blank.expand(columns - len(r), *r.shape[1:])]) for r in rows]
        return image_grid(torch.cat(padded), columns)
    return vector_rows(torch.cat(rows))


def titled(image: Image.Image, title: str, width: int | None = None) -> Image.Image:
    """The image under a one-line title."""
    header = 26
    canvas = Image.new("RGB", (max(image.width, width or 0), image.height + header), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 5), title, fill="black", font=font(14))
    canvas.paste(image, (0, header))
    return canvas


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)),
                       "white")
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    return canvas


def curves_image(metrics: list[dict]) -> Image.Image:
    """ELBO, reconstruction and KL per epoch, train and test: the note's two views over time.

    Runs trained on another objective add its curve (IWAE bound), and runs whose KL weight
    moves add the beta used, so the effect of a schedule can be read off beside the KL.
    """
    rows = [m for m in metrics if "test_elbo" in m]
    epochs = [m["epoch"] for m in rows]
    panels = []
    for key, label in (("elbo", "ELBO"), ("reconstruction", "reconstruction E_q[log p(x|z)]"),
                       ("kl", "KL(q(z|x) || p(z))")):
        chart = Chart(title=f"{label} per example", xlabel="epoch", ylabel="nats", height=300)
        chart.add(epochs, [m.get(f"train_{key}", math.nan) for m in rows], label="train")
        chart.add(epochs, [m[f"test_{key}"] for m in rows], label="test")
        if key == "elbo" and any("test_iwae" in m for m in rows):
            chart.add(epochs, [m.get("test_iwae", math.nan) for m in rows],
                      label="test IWAE bound")
        panels.append(chart.render())
    betas = [m.get("beta", math.nan) for m in rows]
    if len({round(b, 12) for b in betas if not math.isnan(b)}) > 1:
        chart = Chart(title="KL weight beta (mean over the epoch's steps)", xlabel="epoch",
                      ylabel="beta", height=240)
        chart.add(epochs, betas, label="beta", style="line+points")
        panels.append(chart.render())
    return stack_vertically(panels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (a reader never sees half an image)."""
    from .runs import atomic_write_bytes

    atomic_write_bytes(Path(path), png_bytes(image))
