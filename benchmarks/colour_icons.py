"""A folder of synthetic colour icons with transparency: the colour dataset of the benchmarks.

    python benchmarks/colour_icons.py OUT_FOLDER [--n 3000] [--size 48] [--seed 0]

Writes OUT_FOLDER/CLASS/NNNNN.png, RGBA PNGs of `size` x `size` pixels, one class per shape
(circle, square, triangle, diamond, ring, cross). Each icon is a shape of random position,
size, rotation-free orientation and colour (a vertical two-colour gradient fill and a darker
outline) on a fully transparent background whose stored RGB is random noise: what a folder of
app icons exported with transparency looks like to a reader that drops alpha. Drawn with
Pillow only; the same seed gives the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")


def icon(rng: np.random.Generator, shape: str, size: int):
    """One RGBA icon (a PIL image) of `shape`."""
    from PIL import Image, ImageDraw

    scale = 4  # drawn large and reduced: smooth edges and a soft alpha at the border
    big = size * scale
    half = rng.uniform(0.25, 0.42) * big
    cx, cy = rng.uniform(half + 2, big - half - 2, size=2)
    box = (cx - half, cy - half, cx + half, cy + half)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rounded_rectangle(box, radius=half * 0.25, fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)],
                     fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = half * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:  # cross
        arm = half * 0.35
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=255)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=255)
    top, bottom = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    t = np.linspace(0.0, 1.0, big)[:, None, None]  # (H, 1, 1)
    fill = (1 - t) * top + t * bottom  # (H, 1, 3)
    rgb = np.broadcast_to(fill, (big, big, 3)).copy()
    # a darker outline: the mask minus its erosion
    alpha = np.asarray(mask, dtype=np.float64) / 255.0  # (H, W)
    from PIL import ImageFilter

    eroded = np.asarray(mask.filter(ImageFilter.MinFilter(2 * scale + 1)), np.float64) / 255.0
    edge = np.clip(alpha - eroded, 0, 1)[..., None]
    rgb = rgb * (1 - 0.6 * edge)
    rgba = np.concatenate([rgb, 255.0 * alpha[..., None]], axis=-1)
    image = Image.fromarray(np.rint(rgba).astype(np.uint8), "RGBA").resize(
        (size, size), Image.Resampling.BOX)
    # transparent pixels keep random RGB: a reader that drops alpha sees noise there
    pixels = np.asarray(image).copy()
    clear = pixels[..., 3] == 0
    pixels[clear, :3] = rng.integers(0, 256, size=(int(clear.sum()), 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA")


def make_icons(folder: Path, n: int = 3000, size: int = 48, seed: int = 0) -> Path:
    """Write n icons (an equal share per shape) into folder/SHAPE/; returns the folder."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        (folder / shape).mkdir(parents=True, exist_ok=True)
        icon(rng, shape, size).save(folder / shape / f"{i:05d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_icons(Path(args.out), args.n, args.size, args.seed)
    print(f"wrote {args.n} icons of {args.size} x {args.size} to {args.out}")


if __name__ == "__main__":
    main()
