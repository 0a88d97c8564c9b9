"""Pictures of a VAE: tensors in, PIL images out (grids, reconstructions, training curves, and
the latent space: interpolations, traversals, manifold maps, embeddings, via `LatentSpace`)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .errors import ConfigError
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


# ------------------------------------------------------------------------------------------------
# The latent space: codes of examples, paths through codes, and their pictures.
#
# Paths are computed on codes z (D,) and decoded in one batch; pictures show E[x | z] in the
# data's units (Pipeline.display). Dimensions are numbered from 0 and ordered by use: the mean
# over test examples of KL(q(z_d | x) || p(z_d)) (estimate.kl_per_dimension).

# nats: below this a dimension's posterior is the prior for (almost) every x. With posterior
# variances near the prior's, KL_d ~ Var_x(E[z_d | x]) / 2, so this is about the active-unit
# threshold of Burda et al. (2016), Var_x(E[z_d | x]) < 0.01.
UNUSED_KL = 0.01


def interpolation_path(start: Tensor, end: Tensor, steps: int, mode: str = "linear") -> Tensor:
    """`steps` codes from start to end (D,), both ends included exactly. (steps, D)

    linear: (1 - t) start + t end. spherical: slerp (Shoemake 1985), which turns the angle w
    between the codes at a constant rate, sin((1 - t) w) / sin w start + sin(t w) / sin w end;
    where the angle is undefined (a zero code, (anti)parallel codes), the straight line.
    """
    if mode not in ("linear", "spherical"):
        raise ValueError(f"unknown interpolation mode {mode!r}: choose one of linear, spherical")
    if steps < 2:
        raise ConfigError(f"an interpolation needs at least 2 steps (its two ends), got {steps}")
    t = torch.linspace(0, 1, steps, dtype=start.dtype, device=start.device)[:, None]  # (S, 1)
    path = (1 - t) * start + t * end  # (S, D)
    if mode == "spherical" and min(float(start.norm()), float(end.norm())) > 1e-6:
        cos = torch.nn.functional.cosine_similarity(start, end, dim=0).clamp(-1, 1)
        omega = torch.arccos(cos)
        if float(torch.sin(omega)) > 1e-6:
            path = (torch.sin((1 - t) * omega) * start + torch.sin(t * omega) * end) \
                / torch.sin(omega)  # (S, D)
    path[0], path[-1] = start, end  # exactly the two codes, whatever the rounding
    return path


@dataclass
class Interpolation:
    indices: tuple[int, int]  # test examples at the two ends
    mode: str  # linear | spherical
    inputs: Tensor  # (2, *shape) the two examples as the model sees them, data units
    codes: Tensor  # (S, D) the path, from one posterior mean to the other
    decoded: Tensor  # (S, *shape) E[x | z] along the path, data units


@dataclass
class Traversal:
    dims: list[int]  # one row each, most used first
    values: Tensor  # (S,) the values each dimension takes in turn
    base: Tensor  # (D,) the code the other dimensions keep
    base_name: str
    kl: Tensor  # (K,) mean KL per row's dimension, nats
    unused: list[bool]  # per row: KL below UNUSED_KL
    decoded: Tensor  # (K, S, *shape) data units
    latent_dim: int
    unused_in_all: int  # unused dimensions among all latent_dim, shown or not


@dataclass
class Manifold:
    dims: tuple[int, int]  # (horizontal, vertical) latent dimensions
    values: Tensor  # (G,) code values along each axis, increasing (prior quantiles)
    base: Tensor  # (D,) the code the other dimensions keep (when D > 2)
    base_name: str
    latent_dim: int
    decoded: Tensor  # (G, G, *shape) data units; row 0 is the top (highest vertical value)


@dataclass
class Embedding:
    means: Tensor  # (N, D) posterior mean codes of the test examples
    scales: Tensor  # (N, D) posterior standard deviations (of the Gaussian before any squashing)
    labels: Tensor | None  # (N,) int64
    label_names: list[str] | None

    def projection(self) -> tuple[Tensor, list[str], Tensor]:
        """2-D points (N, 2), their axis names, and the (2, D) projection that made them.

        Two or fewer dimensions are shown as they are; more are projected on the first two
        principal components of the means (Pearson 1901), named with their share of variance.
        """
        means = self.means.double()
        n, dims = means.shape
        if dims <= 2:
            eye = torch.eye(2, dims, dtype=torch.float64)
            points = torch.cat([means, torch.zeros(n, 2 - dims, dtype=torch.float64)], 1)
            return points, [f"z{d}" for d in range(dims)] + ["(none)"] * (2 - dims), eye
        centred = means - means.mean(0)  # (N, D)
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        share = singular ** 2 / (singular ** 2).sum().clamp_min(1e-300)
        components = vh[:2]  # (2, D)
        names = [f"PC{i + 1} of the posterior means ({100 * float(share[i]):.0f}% of variance)"
                 for i in range(2)]
        return centred @ components.T, names, components  # (N, 2)


class LatentSpace:
    """A trained model and the test examples its latent space is explored from.

    What the latent-space commands and the explorer share: posterior codes of test examples,
    dimensions ordered by use, base codes, paths, and decoding to the data's units.
    """

    def __init__(self, model, pipeline, test_x: Tensor, test_y: Tensor | None = None,
                 label_names: list[str] | None = None, kl_samples: int = 16):
        self.model, self.pipeline = model, pipeline
        self.test_x, self.test_y, self.label_names = test_x, test_y, label_names
        self.kl_samples = kl_samples
        self.device = next(model.parameters()).device
        self._kl: Tensor | None = None

    @classmethod
    def of_run(cls, run, dataset=None) -> "LatentSpace":
        """The run's model with its test set (loaded and checked against the run if not given).

        Latent steering decodes codes without a class label and lays them out dimension by
        dimension, so it takes unconditional runs whose prior factorises (normal, uniform).
        """
        from .distributions import FACTORISED_PRIORS
        from .runs import load_run_dataset

        if run.config.conditional or run.config.prior not in FACTORISED_PRIORS:
            what = "is conditional" if run.config.conditional else \
                f"has prior {run.config.prior}"
            raise ConfigError(f"{run.path} {what}; latent steering (traverse, manifold, "
                              "interpolate, embed, explore) needs an unconditional run with a "
                              "prior that factorises over dimensions "
                              f"({', '.join(FACTORISED_PRIORS)})")
        dataset = dataset if dataset is not None else load_run_dataset(run)
        return cls(run.model, run.pipeline, dataset.test_x, dataset.test_y, dataset.label_names)

    # --- facts ----------------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.test_x.shape[1:])

    @property
    def prior(self):
        """The prior's module: range(), interpolation_modes, description."""
        return self.model.prior_module

    @property
    def kl_per_dimension(self) -> Tensor:
        """(D,) float64: mean KL(q(z_d | x) || p(z_d)) over the test set, nats (computed once)."""
        if self._kl is None:
            from .estimate import kl_per_dimension

            self._kl = kl_per_dimension(self.model, self.test_x, self.pipeline,
                                        samples=self.kl_samples).mean(0).cpu()
        return self._kl

    @property
    def dims_by_use(self) -> list[int]:
        """All dimensions, most used (largest mean KL) first; ties keep index order."""
        kl = self.kl_per_dimension.tolist()
        return sorted(range(self.latent_dim), key=lambda d: -kl[d])

    @property
    def unused(self) -> list[bool]:
        return [value < UNUSED_KL for value in self.kl_per_dimension.tolist()]

    # --- codes ----------------------------------------------------------------------------
    def check_index(self, index: int) -> int:
        n = len(self.test_x)
        if not 0 <= index < n:
            raise ConfigError(f"test example {index} does not exist: the test set holds {n} "
                              f"examples, numbered 0 to {n - 1}")
        return index

    def inputs(self, indices: list[int]) -> Tensor:
        """Test examples as the model sees them (fixed noise per index). (B, *shape)"""
        rows = [self.pipeline.fixed(self.test_x[i:i + 1].to(self.device), self.check_index(i))
                for i in indices]
        return torch.cat(rows)

    @torch.inference_mode()
    def codes(self, x: Tensor) -> Tensor:
        """Posterior mean codes of model inputs x (B, *shape). (B, D)"""
        from .distributions import posterior_mean_code

        return posterior_mean_code(self.model.encode(x.to(self.device)))

    def code_of(self, index: int) -> Tensor:
        """The posterior mean code of test example `index`. (D,)"""
        return self.codes(self.inputs([index]))[0]

    def centre(self) -> Tensor:
        """The prior's median, coordinate by coordinate (0 for the normal, 1/2 for the uniform)."""
        from .distributions import per_dimension

        prior = per_dimension(self.model.prior)  # batch (D,)
        return prior.icdf(torch.full((self.latent_dim,), 0.5, device=self.device))  # (D,)

    def base_code(self, index: int | None = None) -> tuple[Tensor, str]:
        """A code to vary around: test example `index`'s posterior mean, or the prior's centre."""
        if index is None:
            return self.centre(), "the prior's centre"
        return self.code_of(index), f"test example {index}'s posterior mean"

    @torch.inference_mode()
    def decode(self, z: Tensor) -> Tensor:
        """E[x | z] in the data's units for codes z (..., D). (..., *shape)"""
        return self.pipeline.display(self.model.decode(z.to(self.device)).mean)

    # --- paths ----------------------------------------------------------------------------
    def interpolation(self, start: int, end: int, steps: int = 10,
                      mode: str | None = None) -> Interpolation:
        """Decode the path between the posterior means of test examples `start` and `end`."""
        modes = self.prior.interpolation_modes
        mode = mode or modes[0]
        if mode not in modes:
            raise ConfigError(f"interpolation mode {mode!r} does not suit the "
                              f"{self.prior.description} prior: use {' or '.join(modes)}")
        x = self.inputs([start, end])  # (2, *shape)
        codes = self.codes(x)  # (2, D)
        path = interpolation_path(codes[0], codes[1], steps, mode)  # (S, D)
        return Interpolation((start, end), mode, self.pipeline.display(x).cpu(), path.cpu(),
                             self.decode(path).cpu())

    def traversal(self, dims: list[int] | None = None, steps: int = 9, width: float = 3.0,
                  base: int | None = None) -> Traversal:
        """Vary each dimension in turn over the prior's range, the others kept at a base code."""
        dims = self.dims_by_use if dims is None else self._check_dims(dims)
        if steps < 2:
            raise ConfigError(f"a traversal needs at least 2 steps, got {steps}")
        if not (math.isfinite(width) and width > 0):
            raise ConfigError(f"the traversal range must be a positive number of prior standard "
                              f"deviations, got {width}")
        order = {d: rank for rank, d in enumerate(self.dims_by_use)}
        dims = sorted(dims, key=order.__getitem__)
        low, high = self.prior.range(width)
        values = torch.linspace(low, high, steps)  # (S,)
        base_code, base_name = self.base_code(base)
        codes = base_code.cpu().repeat(len(dims), steps, 1)  # (K, S, D)
        for row, d in enumerate(dims):
            codes[row, :, d] = values
        kl = self.kl_per_dimension[dims]
        return Traversal(dims, values, base_code.cpu(), base_name, kl,
                         [self.unused[d] for d in dims], self.decode(codes).cpu(),
                         self.latent_dim, sum(self.unused))

    def manifold(self, grid: int = 20, base: int | None = None) -> Manifold:
        """Decode a G x G grid of codes laid out by the prior's inverse CDF (Kingma & Welling).

        Grid points sit at the centres of G equal-probability intervals, u = (i + 1/2) / G, so
        every cell stands for the same prior mass. With more than two dimensions, the plane of
        the two most-used ones, the others kept at the base code.
        """
        from .distributions import per_dimension

        if self.latent_dim < 2:
            raise ConfigError("a manifold map needs at least 2 latent dimensions; this run has 1 "
                              "(see vaekit traverse instead)")
        if grid < 2:
            raise ConfigError(f"the manifold grid needs at least 2 points a side, got {grid}")
        x_dim, y_dim = (0, 1) if self.latent_dim == 2 else tuple(self.dims_by_use[:2])
        u = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid  # (G,)
        prior = per_dimension(self.model.prior)  # batch (D,)
        quantiles = prior.icdf(u[:, None].expand(grid, self.latent_dim).to(self.device)).cpu()
        base_code, base_name = self.base_code(base)
        codes = base_code.cpu().repeat(grid, grid, 1)  # (G, G, D)
        codes[:, :, x_dim] = quantiles[:, x_dim][None, :]  # columns: x increasing
        codes[:, :, y_dim] = quantiles.flip(0)[:, y_dim][:, None]  # rows: y decreasing
        return Manifold((x_dim, y_dim), quantiles[:, x_dim], base_code.cpu(), base_name,
                        self.latent_dim, self.decode(codes).cpu())

    def embeddings(self, batch_size: int = 1000) -> Embedding:
        """Posterior means and scales of every test example."""
        from .distributions import base_normal, posterior_mean_code
        from .estimate import map_examples

        def mean_and_scale(x: Tensor, start: int, stop: int) -> Tensor:
            q = self.model.encode(x)
            return torch.cat([posterior_mean_code(q), base_normal(q).scale], 1)  # (b, 2D)

        both = map_examples(mean_and_scale, self.test_x, self.pipeline, "test", batch_size,
                            self.device, outputs=2 * self.latent_dim).float().cpu()
        means, scales = both.split(self.latent_dim, dim=1)
        return Embedding(means, scales, self.test_y, self.label_names)

    def _check_dims(self, dims: list[int]) -> list[int]:
        for d in dims:
            if not 0 <= d < self.latent_dim:
                raise ConfigError(f"latent dimension {d} does not exist: this run's are numbered "
                                  f"0 to {self.latent_dim - 1}")
        if len(set(dims)) != len(dims) or not dims:
            raise ConfigError("give each latent dimension once, for example --dims 0,3")
        return list(dims)


# --- pictures of the latent space ---------------------------------------------------------------


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


def interpolation_image(interpolation: Interpolation) -> Image.Image:
    """The two inputs at the ends of a row, the decoded path between them."""
    start, end = interpolation.indices
    steps = len(interpolation.codes)
    shown = torch.cat([interpolation.inputs[:1], interpolation.decoded,
                       interpolation.inputs[1:]])  # (S + 2, *shape)
    if is_image_shape(tuple(shown.shape[1:])):
        picture = image_grid(shown, columns=steps + 2)
    else:
        picture = vector_rows(shown)
    layout = "left to right" if is_image_shape(tuple(shown.shape[1:])) else "top to bottom"
    return titled(picture, f"Interpolation, test example {start} -> {end}: {steps} codes on a "
                  f"{interpolation.mode} path between their posterior means, decoded\n"
                  f"({layout}: input {start}, E[x|z] along the path, input {end})")


def traversal_image(traversal: Traversal) -> Image.Image:
    """One row per dimension, most used first; unused dimensions greyed and marked."""
    rows = joint_rows(traversal.decoded)
    labels, colors = [], []
    for d, kl, unused in zip(traversal.dims, traversal.kl.tolist(), traversal.unused):
        labels.append(f"z{d}  KL {kl:.2f}" + ("  unused" if unused else ""))
        colors.append("#999999" if unused else "black")
    header = None
    shape = tuple(traversal.decoded.shape[2:])
    if is_image_shape(shape):
        _, cell_w = cell_size(shape)
        header = [(2 + c * (cell_w + 2) + cell_w / 2, f"{v:.2g}")
                  for c, v in enumerate(traversal.values.tolist())]
    picture = labelled_rows(rows, labels, colors, header)
    return titled(picture, f"Latent traversals: each row varies one of {traversal.latent_dim} "
                  f"dimensions over the prior's range, the others at {traversal.base_name}\nrows "
                  f"ordered by mean KL(q(z_d|x) || p(z_d)) over the test set, in nats; "
                  f"{traversal.unused_in_all or 'none'} of {traversal.latent_dim} unused "
                  f"(KL < {UNUSED_KL:g})")


def manifold_image(manifold: Manifold) -> Image.Image:
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
        return titled(vector_rows(flat), title + " (one row per grid point, row by row)")
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
