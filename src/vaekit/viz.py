"""Pictures of a VAE: tensors in, PIL images out (grids, reconstructions, training curves, and
the latent space: interpolations, traversals, manifold maps, embeddings, as computed by
latent_space.LatentSpace). No model logic lives here."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .plot import Chart, font
from .table_pictures import FeatureScale, table_image

if TYPE_CHECKING:  # what the latent-space pictures draw
    from .latent_space import Embedding, Interpolation, Manifold, Traversal

# LatentSpace and what it computes moved to latent_space.py; their old import path keeps working
MOVED_TO_LATENT_SPACE = ("LatentSpace", "interpolation_path", "UNUSED_KL", "Interpolation",
                         "Traversal", "Manifold", "Embedding")


def __getattr__(name: str):
    if name in MOVED_TO_LATENT_SPACE:
        from . import latent_space

        return getattr(latent_space, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    cell_h, cell_w = cell_size(tuple(images.shape[1:]))
    zoom = cell_h // height
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


def cell_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) in pixels of one image (C, H, W) in image_grid: enlarged by a whole factor."""
    height, width = shape[1], shape[2]
    zoom = max(1, math.ceil(MIN_CELL / max(height, width)))
    return height * zoom, width * zoom


def vector_rows(vectors: Tensor, cell: int = 10,
                limits: tuple[float, float] | None = None) -> Image.Image:
    """Non-image data (N, D) as a heat map, one row per example (blue low, red high).

    limits: the values shown as pure blue and pure red (default: the data's min and max); give
    the same limits to pictures that must be compared.
    """
    values = vectors.detach().float().reshape(len(vectors), -1).cpu()
    lo, hi = limits if limits is not None else (float(values.min()), float(values.max()))
    values = values.clamp(lo, hi)
    scaled = ((values - lo) / (hi - lo if hi > lo else 1.0)).numpy()  # (N, D) in [0, 1]
    rgb = np.stack([scaled, 1 - np.abs(2 * scaled - 1), 1 - scaled], axis=-1)
    pixels = (rgb * 255).astype(np.uint8).repeat(cell, axis=0).repeat(cell, axis=1)
    return Image.fromarray(pixels)


def single_image(x: Tensor, limits: tuple[float, float] | None = None) -> Image.Image:
    """One example at its own size: an image (C, H, W) in [0, 1], else a one-row heat map."""
    if not is_image_shape(tuple(x.shape)):
        return vector_rows(x.reshape(1, -1), limits=limits)
    pixels = (x.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).numpy()
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0], "L")
    return Image.fromarray(pixels.transpose(1, 2, 0), "RGB")


def examples_image(x: Tensor, columns: int | None = None,
                   features: FeatureScale | None = None) -> Image.Image:
    """Images as a grid, anything else as heat-map rows (per feature on `features`' scale)."""
    if is_image_shape(tuple(x.shape[1:])):
        return image_grid(x, columns)
    if features is not None:
        return table_image([x], features)
    return vector_rows(x)


def class_rows_image(images: Tensor, names: list[str], pad: int = 2,
                     features: FeatureScale | None = None) -> Image.Image:
    """One row per class, its name at the left: images (len(names) * m, ...) class by class."""
    per_class = len(images) // len(names)
    if features is not None and not is_image_shape(tuple(images.shape[1:])):
        return table_image(list(images.split(per_class)), features, labels=names)
    if not is_image_shape(tuple(images.shape[1:])):
        grid = vector_rows(images)
    else:
        grid = image_grid(images, columns=per_class, pad=pad)
    return named_grid_rows(grid, names)


def named_grid_rows(grid: Image.Image, names: list[str]) -> Image.Image:
    """The grid with one name at the left of each of its len(names) rows of equal height."""
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


def reconstruction_image(originals: Tensor, reconstructions: Tensor, columns: int = 8,
                         inputs: Tensor | None = None, input_name: str = "model input",
                         features: FeatureScale | None = None) -> Image.Image:
    """Groups of labelled rows: the original examples, what the model sees of them (inputs,
    when that differs: a binarisation, a dequantisation) and their reconstructions. Tabular data
    (features given): the same groups as blocks of values per feature (table_pictures.py)."""
    rows, names = [], []
    for start in range(0, len(originals), columns):
        group = [("original", originals)] + ([(input_name, inputs)] if inputs is not None
                                             else []) + [("reconstruction", reconstructions)]
        for name, images in group:
            rows.append(images[start:start + columns])
            names.append(name)
    if features is not None and not is_image_shape(tuple(originals.shape[1:])):
        labels = []
        for start in range(0, len(originals), columns):
            stop = min(start + columns, len(originals))
            labels += [f"inputs {start}-{stop - 1}"] + (
                [input_name] if inputs is not None else []) + ["reconstructed"]
        return table_image(rows, features, labels=labels)
    if is_image_shape(tuple(originals.shape[1:])):
        blank = torch.ones_like(originals[:1])
        padded = [torch.cat([r, blank.expand(columns - len(r), *r.shape[1:])]) for r in rows]
        return named_grid_rows(image_grid(torch.cat(padded), columns), names)
    return named_grid_rows(vector_rows(torch.cat(rows)),
                         [name for r, name in zip(rows, names) for _ in range(len(r))])


def titled(image: Image.Image, title: str, width: int | None = None) -> Image.Image:
    """The image under a title (one line per newline in it), widened to fit the title."""
    lines = title.split("\n")
    title_font = font(14)
    measure = ImageDraw.Draw(image)
    text_width = max(int(measure.textlength(line, font=title_font)) for line in lines) + 12
    header = 8 + 18 * len(lines)
    canvas = Image.new("RGB", (max(image.width, width or 0, text_width), image.height + header),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((6, 5 + 18 * row), line, fill="black", font=title_font)
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
    # (early stopping's last record restates its best epoch: a point already drawn)
    rows = [m for m in metrics if "test_elbo" in m and "early_stopping" not in m]
    epochs = [m["epoch"] for m in rows]
    panels = []
    for key, label in (("elbo", "ELBO"), ("reconstruction", "reconstruction E_q[log p(x|z)]"),
                       ("kl", "KL(q(z|x) || p(z))")):
        chart = Chart(title=f"{label} per example", xlabel="epoch", ylabel="nats", height=300)
        chart.add(epochs, [m.get(f"train_{key}", math.nan) for m in rows], label="train")
        chart.add(epochs, [m[f"test_{key}"] for m in rows], label="test")
        if key == "elbo" and any("validation_elbo" in m for m in rows):  # early stopping's
            chart.add(epochs, [m.get("validation_elbo", math.nan) for m in rows],
                      label="validation")
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


# ------------------------------------------------------------------------------------------------
# Pictures of the latent space: what latent_space.LatentSpace computed (Interpolation, Traversal,
# Manifold, Embedding), drawn. E[x | z] is shown in the data's units.


def joint_rows(blocks: Tensor) -> list[Image.Image]:
    """One picture per block of examples (K, S, *shape), on one shared colour scale."""
    if is_image_shape(tuple(blocks.shape[2:])):
        return [image_grid(block, columns=len(block)) for block in blocks]
    limits = (float(blocks.min()), float(blocks.max()))
    gap = 4  # white pixels under each block, which image_grid's padding gives images
    rows = []
    for block in blocks:
        heat_map = vector_rows(block, limits=limits)
        row = Image.new("RGB", (heat_map.width, heat_map.height + gap), "white")
        row.paste(heat_map, (0, 0))
        rows.append(row)
    return rows


def labelled_rows(rows: list[Image.Image], labels: list[str], colors: list[str] | None = None,
                  header: list[tuple[float, str]] | None = None) -> Image.Image:
    """Rows stacked with a label on the left; header: (x offset in a row, text) above them."""
    label_font = font(13)
    measure = ImageDraw.Draw(rows[0])
    margin = max(int(measure.textlength(text, font=label_font)) for text in labels) + 14
    top = 20 if header else 0
    canvas = Image.new("RGB", (margin + max(r.width for r in rows),
                               top + sum(r.height for r in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for x, text in header or []:
        width = draw.textlength(text, font=font(11))
        draw.text((margin + x - width / 2, 4), text, fill="#444444", font=font(11))
    y = top
    for row, text, color in zip(rows, labels, colors or ["black"] * len(rows)):
        canvas.paste(row, (margin, y))
        draw.text((6, y + row.height / 2 - 8), text, fill=color, font=label_font)
        y += row.height
    return canvas


def interpolation_image(interpolation: Interpolation,
                        features: FeatureScale | None = None) -> Image.Image:
    """The two inputs at the ends of a row, the decoded path between them."""
    start, end = interpolation.indices
    steps = len(interpolation.codes)
    shown = torch.cat([interpolation.inputs[:1], interpolation.decoded,
                       interpolation.inputs[1:]])  # (S + 2, *shape)
    if is_image_shape(tuple(shown.shape[1:])):
        picture = image_grid(shown, columns=steps + 2)
    elif features is not None:
        picture = table_image([interpolation.inputs[:1], interpolation.decoded,
                               interpolation.inputs[1:]], features,
                              labels=[f"input {start}", f"{steps} codes", f"input {end}"])
    else:
        picture = vector_rows(shown)
    layout = "left to right" if is_image_shape(tuple(shown.shape[1:])) else "top to bottom"
    return titled(picture, f"Interpolation, test example {start} -> {end}: {steps} codes on a "
                  f"{interpolation.mode} path between their posterior means, decoded\n"
                  f"({layout}: input {start}, E[x|z] along the path, input {end})")


def traversal_image(traversal: Traversal, features: FeatureScale | None = None) -> Image.Image:
    """One row per dimension, most used first; unused dimensions greyed and marked. Tabular
    data (features given): a block of rows per dimension, one row per value, top to bottom."""
    labels, colors = [], []
    for d, kl, unused in zip(traversal.dims, traversal.kl.tolist(), traversal.unused):
        labels.append(f"z{d}  KL {kl:.2f}" + ("  unused" if unused else ""))
        colors.append("#999999" if unused else "black")
    header = None
    shape = tuple(traversal.decoded.shape[2:])
    if features is not None and not is_image_shape(shape):
        values = ", ".join(f"{v:.2g}" for v in traversal.values.tolist())
        picture = table_image(list(traversal.decoded), features, labels, colors)
        return titled(picture, f"Latent traversals: each block varies one of "
                      f"{traversal.latent_dim} dimensions over {values} (top to bottom), the "
                      f"others at {traversal.base_name}\nblocks ordered by mean KL(q(z_d|x) || "
                      f"p(z_d)) over the test set, in nats; {traversal.unused_in_all or 'none'} "
                      f"of {traversal.latent_dim} unused (KL < {traversal.unused_threshold:g})")
    rows = joint_rows(traversal.decoded)
    if is_image_shape(shape):
        _, cell_w = cell_size(shape)
        header = [(2 + c * (cell_w + 2) + cell_w / 2, f"{v:.2g}")
                  for c, v in enumerate(traversal.values.tolist())]
    picture = labelled_rows(rows, labels, colors, header)
    return titled(picture, f"Latent traversals: each row varies one of {traversal.latent_dim} "
                  f"dimensions over the prior's range, the others at {traversal.base_name}\nrows "
                  f"ordered by mean KL(q(z_d|x) || p(z_d)) over the test set, in nats; "
                  f"{traversal.unused_in_all or 'none'} of {traversal.latent_dim} unused "
                  f"(KL < {traversal.unused_threshold:g})")


def manifold_image(manifold: Manifold, features: FeatureScale | None = None) -> Image.Image:
    """The decoded grid with its axes' code values (Kingma & Welling 2014, figure 4)."""
    grid = len(manifold.values)
    shape = tuple(manifold.decoded.shape[2:])
    x_dim, y_dim = manifold.dims
    if manifold.latent_dim == 2:
        title = (f"Learned 2-D manifold: z{x_dim} across, z{y_dim} up, a {grid} x {grid} grid "
                 "of prior quantiles, decoded E[x|z]")
    else:
        title = (f"Latent plane of z{x_dim} (across) and z{y_dim} (up), the two most-used of "
                 f"{manifold.latent_dim} dimensions; the others at {manifold.base_name}\n"
                 f"a {grid} x {grid} grid of prior quantiles, decoded E[x|z]")
    flat = manifold.decoded.reshape(grid * grid, *shape)
    if not is_image_shape(shape):
        picture = table_image([flat], features) if features is not None else vector_rows(flat)
        return titled(picture, title + " (one row per grid point, row by row)")
    picture = image_grid(flat, columns=grid)
    cell_h, cell_w = cell_size(shape)
    tick_font = font(11)
    values = [f"{v:.2g}" for v in manifold.values.tolist()]
    margin, bottom = 44, 34
    canvas = Image.new("RGB", (margin + picture.width, picture.height + bottom), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    every = max(1, math.ceil(28 / cell_w))  # skip labels that would overlap
    for i, text in enumerate(values):
        if i % every:
            continue
        x = margin + 2 + i * (cell_w + 2) + cell_w / 2
        draw.text((x - draw.textlength(text, font=tick_font) / 2, picture.height + 2), text,
                  fill="#444444", font=tick_font)
        y = 2 + (grid - 1 - i) * (cell_h + 2) + cell_h / 2
        draw.text((margin - 4 - draw.textlength(text, font=tick_font), y - 6), text,
                  fill="#444444", font=tick_font)
    label = f"z{x_dim} ->"
    draw.text((margin + picture.width / 2 - 20, picture.height + 17), label, fill="black",
              font=font(12))
    draw.text((4, 2), f"z{y_dim}", fill="black", font=font(12))
    return titled(canvas, title)


def embedding_image(embedding: Embedding, seed: int = 0) -> Image.Image:
    """Posterior means of the test set, coloured by label; PCA beyond two dimensions."""
    from .plot import PALETTE

    points, names, _ = embedding.projection()
    n, dims = embedding.means.shape
    # A seeded shuffle: drawn in class order, the last class would hide the others.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    labels = embedding.labels
    colors, legend = ["#1f77b4"] * n, None
    if labels is not None:
        present = sorted(set(labels.tolist()))
        names_of = embedding.label_names or []
        colors = [PALETTE[int(c) % len(PALETTE)] for c in labels.tolist()]
        legend = [(names_of[c] if c < len(names_of) else str(c), PALETTE[c % len(PALETTE)])
                  for c in present][:len(PALETTE)]
    how = "as they are" if dims <= 2 else f"projected from {dims} dimensions by PCA"
    chart = Chart(title=f"Posterior means of {n} test examples, {how}", xlabel=names[0],
                  ylabel=names[1], width=820, height=640, legend=legend)
    pts = points[order]
    chart.add(pts[:, 0].tolist(), pts[:, 1].tolist(), style="points",
              point_colors=[colors[i] for i in order.tolist()], radius=2.0 if n > 2000 else 3.0)
    return chart.render()
