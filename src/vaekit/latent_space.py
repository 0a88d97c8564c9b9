"""The latent space of a trained model: codes of test examples, dimensions ordered by use, and
paths through codes (interpolations, traversals, manifold maps, embeddings) decoded to the data's
units. What the latent-space commands and the explorer share; viz.py draws the results.

Paths are computed on codes z (D,) and decoded in one batch; pictures show E[x | z] in the
data's units (Pipeline.display). Dimensions are numbered from 0 and ordered by use: the mean
over test examples of KL(q(z_d | x) || p(z_d)) (estimate.kl_per_dimension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError

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

    @property
    def unused_threshold(self) -> float:
        return UNUSED_KL  # nats


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


def group_view(model, group: str, context_x: Tensor | None):
    """A hierarchy seen through its group called `group` (hierarchy.GroupView)."""
    from .hierarchy import GroupView, HierarchicalVAE, group_index

    if not isinstance(model, HierarchicalVAE):
        raise ConfigError(f"--group {group}: this run has one latent group; --group chooses a "
                          "group of a hierarchical run (vaekit train --latent-groups)")
    try:
        return GroupView(model, group_index(model, group), context_x)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


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
        self._lower: list[dict] | None = None

    @classmethod
    def of_run(cls, run, dataset=None, group: str | None = None,
               context: int | None = None) -> "LatentSpace":
        """The run's model with its test set (loaded and checked against the run if not given).

        Latent steering decodes codes without a class label and lays them out dimension by
        dimension, so it takes unconditional runs whose prior factorises (normal, uniform). A
        hierarchy is steered by its top group, or by `group` (its name, z1 the top), with the
        groups above at test example `context`'s posterior means (None: their prior means).
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
        from .hierarchy import single_latent_view

        model = single_latent_view(run.model)  # a hierarchy is steered by its top group
        space = cls(model, run.pipeline, dataset.test_x, dataset.test_y, dataset.label_names)
        if group is not None:
            space.model = group_view(run.model, group, None if context is None else
                                     space.inputs([context]))
        return space

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

    @property
    def detail_dim(self) -> int:
        """Latent dimensions below the steered ones (a hierarchy's lower groups), else 0."""
        return getattr(self.model, "detail_dim", 0)

    @property
    def lower_groups(self) -> list[dict]:
        """The groups below the steered one (a hierarchy's detail), each in its prior's own
        coordinates (hierarchy.GroupView): name, dims, its offset in the detail vector, and the
        mean KL of each dimension over the test set with dimensions by use (computed once)."""
        if self._lower is None:
            from .estimate import kl_per_dimension
            from .hierarchy import GroupView

            hierarchy = getattr(self.model, "hierarchy", None)
            first = getattr(self.model, "index", 0) + 1
            self._lower, offset = [], 0
            for index in range(first, len(getattr(hierarchy, "groups_sizes", ()))):
                view = GroupView(hierarchy, index, None)
                kl = kl_per_dimension(view, self.test_x, self.pipeline,
                                      samples=self.kl_samples).mean(0).cpu()
                values = kl.tolist()
                self._lower.append({
                    "name": view.name, "dims": view.latent_dim, "offset": offset,
                    "kl_per_dimension": values,
                    "dims_by_use": sorted(range(view.latent_dim), key=lambda d: -values[d]),
                    "unused": [value < UNUSED_KL for value in values]})
                offset += view.latent_dim
        return self._lower

    @property
    def groups(self) -> list[tuple[str, int]]:
        """The model's latent groups ((name, dims), ...), the steered one first."""
        model = getattr(self.model, "hierarchy", self.model)
        return [(name, dims) for name, dims in getattr(model, "latent_groups",
                                                        (("z", self.latent_dim),))]

    @torch.inference_mode()
    def decode(self, z: Tensor, detail: Tensor | None = None) -> Tensor:
        """E[x | z] in the data's units for codes z (..., D); detail (..., detail_dim): noise of
        the lower groups of a hierarchy (None: at their prior means). (..., *shape)"""
        if detail is None:
            return self.pipeline.display(self.model.decode(z.to(self.device)).mean)
        return self.pipeline.display(self.model.decode(z.to(self.device),
                                                       detail=detail.to(self.device)).mean)

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
        from .distributions import posterior_mean_code
        from .estimate import map_examples
        from .posteriors import posterior_scale

        def mean_and_scale(x: Tensor, start: int, stop: int) -> Tensor:
            q = self.model.encode(x)
            return torch.cat([posterior_mean_code(q), posterior_scale(q)], 1)  # (b, 2D)

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
