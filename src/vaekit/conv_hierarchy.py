"""A convolutional hierarchical VAE for images: latent groups that are feature maps, at two
resolutions, in residual convolutional cells (after NVAE and VDVAE).

    bottom-up    x (C_x, H, W) -> 3x3 stem and a residual cell at H x W -> stride-2 to
                 ceil(H/2) x ceil(W/2) (fine), cell -> stride-2 to ceil(H/4) x ceil(W/4)
                 (coarse), cell: one feature map per resolution
    top-down     s_0 learned (C, coarse); for l = 1 .. L, at its resolution r_l:
                   z_l (c_l, r_l) ~ p(z_l | s_{l-1})   (the top group's N(0, I))
                   q(z_l | x, z_<l) = the prior shifted and rescaled by 1x1 convolutions of
                   the feature map at r_l and the state (NVAE's residual normal)
                   s_l = cell(s_{l-1} + conv1x1(z_l)), upsampled to the fine resolution after
                   the last coarse group
    decoder      the last state, upsampled to H x W, a residual cell, 3x3 -> the likelihood's
                 parameters

The top ceil(L/2) groups sit at the coarse resolution (global shape), the others at the fine one
(local detail). `--latent-groups c_1,...,c_L` gives each group's channels; a group of c channels
at r_h x r_w holds D_l = c r_h r_w latent dimensions, flattened for latent.py's interface (the
noise, q and p are over those D_l numbers). `--conv-channels C` sets the state's channels
(default 64). Everything else, the prior, posteriors relative to it, bounded log-scales, cells
starting near the identity, every objective and estimator, is hierarchy.py's: this model
subclasses its HierarchicalVAE and gives conv versions of its groups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional

from .hierarchy import HierarchicalVAE, ResidualBlock, bounded_log_scale, diagonal_normal
from .model import _full_precision
from .nets import activation
from .posteriors import DiagonalGaussian

DEFAULT_CHANNELS = 64


def on_maps(module: nn.Module, maps: Tensor) -> Tensor:
    """A 2-d module on maps (..., C, h, w) with any leading dimensions (samples, batch)."""
    lead = maps.shape[:-3]
    out = module(maps.reshape(-1, *maps.shape[-3:]))  # (N, C', h', w')
    return out.reshape(*lead, *out.shape[1:])


def resized(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Maps (..., C, h, w) resized to size by nearest neighbours (an exact 2x where it is)."""
    lead = maps.shape[:-3]
    out = functional.interpolate(maps.reshape(-1, *maps.shape[-3:]), size=size, mode="nearest")
    return out.reshape(*lead, *out.shape[1:])


def conv3x3(channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, out_channels, 3, padding=1)


def conv_cell(channels: int, act: str, depth: int) -> ResidualBlock:
    """x + conv3x3(act(conv3x3(act(x)))): hierarchy.py's residual cell with convolutions."""
    return ResidualBlock(channels, act, depth, layer=conv3x3)


class ConvTopDownGroup(nn.Module):
    """One group of feature-map latents (c channels at r_h x r_w): its prior, its posterior
    relative to that prior, and the merge of its draw into the state; the same methods as
    hierarchy.TopDownGroup, so the top-down pass, the prior's draws and the group views serve
    both."""

    def __init__(self, channels: int, latent: int, resolution: tuple[int, int], act: str,
                 top: bool, depth: int, upsample_to: tuple[int, int] | None):
        super().__init__()
        self.latent, self.resolution, self.top = latent, tuple(resolution), top
        self.dim = latent * math.prod(resolution)
        self.upsample_to = None if upsample_to is None else tuple(upsample_to)
        self.prior_net = None if top else nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), activation(act, fresh_input=True),
            nn.Conv2d(channels, 2 * latent, 1))
        self.from_feature = nn.Conv2d(channels, channels, 1)
        self.from_state = nn.Conv2d(channels, channels, 1, bias=False)
        self.posterior_out = nn.Conv2d(channels, 2 * latent, 1)
        self.act = activation(act, fresh_input=True)  # on a fresh sum only
        self.merge_in = nn.Conv2d(latent, channels, 1)
        self.merge_cell = conv_cell(channels, act, depth)
        with torch.no_grad():
            self.merge_in.weight.mul_(1 / math.sqrt(depth))
            self.merge_in.bias.zero_()
            self.posterior_out.weight.mul_(0.1)  # a posterior that starts near its prior
            self.posterior_out.bias.zero_()

    def _flat(self, maps: Tensor) -> Tensor:
        return maps.flatten(-3)  # (..., c, h, w) -> (..., D_l)

    def prior(self, state: Tensor) -> DiagonalGaussian:
        """p(z_l | z_<l) from the state (..., B, C, r_h, r_w); the top group's N(0, I).
        event (D_l,)"""
        if self.top:
            zeros = state.new_zeros(*state.shape[:-3], self.dim)  # (..., B, D_l)
            return diagonal_normal(zeros, zeros)
        loc, raw = _full_precision(on_maps(self.prior_net, state)).chunk(2, dim=-3)
        return diagonal_normal(self._flat(loc), bounded_log_scale(self._flat(raw)))

    def features(self, h: Tensor) -> Tensor:
        """The bottom-up map's share of the posterior network. (B, C, r_h, r_w)"""
        return self.from_feature(h)

    def posterior(self, feature: Tensor, state: Tensor,
                  prior: DiagonalGaussian) -> DiagonalGaussian:
        """q(z_l | x, z_<l): the prior shifted and rescaled (NVAE's residual normal)."""
        hidden = self.act(feature + on_maps(self.from_state, state))  # (..., B, C, r_h, r_w)
        shift, raw = _full_precision(on_maps(self.posterior_out, hidden)).chunk(2, dim=-3)
        normal = prior.base_dist
        return diagonal_normal(normal.loc + self._flat(shift),
                               bounded_log_scale(normal.scale.log() + self._flat(raw)))

    def merge(self, state: Tensor, z: Tensor) -> Tensor:
        """s_l = cell(s_{l-1} + conv1x1(z_l)), upsampled after the last coarse group.
        (..., B, C, r, r)"""
        maps = z.unflatten(-1, (self.latent, *self.resolution))  # (..., B, c, r_h, r_w)
        state = on_maps(self.merge_cell, state + on_maps(self.merge_in, maps))
        return state if self.upsample_to is None else resized(state, self.upsample_to)


class ConvHierarchyDecoder(nn.Module):
    """The last state, flattened (..., C * h * w) -> upsampled to H x W, a cell, 3x3 ->
    the likelihood's parameters (..., *params_shape)."""

    def __init__(self, channels: int, state_hw: tuple[int, int], params_shape: tuple[int, ...],
                 data_shape: tuple[int, ...], act: str, depth: int):
        super().__init__()
        _, height, width = data_shape
        self.state_shape = (channels, *state_hw)
        self.size = (height, width)
        self.params_shape = tuple(params_shape)
        self.cell = conv_cell(channels, act, depth)
        self.act = activation(act)
        self.out = nn.Conv2d(channels, math.prod(params_shape) // (height * width), 3,
                             padding=1)

    def forward(self, code: Tensor, condition: Tensor | None = None) -> Tensor:
        lead = code.shape[:-1]
        maps = code.reshape(-1, *self.state_shape)  # (N, C, h, w)
        maps = functional.interpolate(maps, size=self.size, mode="nearest")  # (N, C, H, W)
        params = self.out(self.act(self.cell(maps)))  # (N, P, H, W)
        return params.reshape(*lead, *self.params_shape)


class ConvHierarchicalVAE(HierarchicalVAE):
    """Feature-map latent groups at two resolutions (see the module docstring). groups: the
    channels c_1 (top) ... c_L of each group; channels: the state's C."""

    def __init__(self, data_shape: tuple[int, ...], groups: list[int], channels: int,
                 likelihood: nn.Module, act: str = "relu"):
        nn.Module.__init__(self)
        if len(data_shape) != 3:
            raise ValueError(f"a convolutional hierarchy models images (C, H, W), not data of "
                             f"shape {tuple(data_shape)}")
        if not 1 <= len(groups) <= 16 or any(c < 1 for c in groups) or channels < 1:
            raise ValueError("a convolutional hierarchy takes 1 to 16 groups of at least one "
                             f"channel each, got {groups}")
        in_channels, height, width = data_shape
        fine = (math.ceil(height / 2), math.ceil(width / 2))
        coarse = (math.ceil(fine[0] / 2), math.ceil(fine[1] / 2))
        depth = len(groups)
        self.coarse_groups = math.ceil(depth / 2)
        resolutions = [coarse if i < self.coarse_groups else fine for i in range(depth)]
        self.resolutions = resolutions
        self.channels = channels
        self.num_classes = None
        self.likelihood = likelihood
        # bottom-up: the stem at H x W, then a stride-2 stage to each resolution
        self.input_layer = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1),
                                         conv_cell(channels, act, depth))
        self.bottom_up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                          conv_cell(channels, act, depth)) for _ in range(2))
        self.top_state = nn.Parameter(torch.zeros(channels, *coarse))
        self.condition_in = None
        self.top_down = nn.ModuleList(
            ConvTopDownGroup(channels, c, resolutions[i], act, top=i == 0, depth=depth,
                             upsample_to=fine if i == self.coarse_groups - 1 and depth > 1
                             else None)
            for i, c in enumerate(groups))
        self.groups_sizes = [group.dim for group in self.top_down]
        self.group_channels = list(groups)
        self.last_resolution = resolutions[-1] if depth > 1 else coarse
        self.decoder = ConvHierarchyDecoder(channels, self.last_resolution,
                                            likelihood.params_shape, data_shape, act, depth)

    @property
    def width(self) -> int:
        return self.channels

    @property
    def code_dim(self) -> int:
        return self.channels * math.prod(self.last_resolution)

    @property
    def inference_elements_per_sample(self) -> int:
        """Numbers one draw's top-down pass holds: per group its prior's, posterior's, merge's
        and cell's maps, and the state."""
        return sum(8 * self.channels * math.prod(r) + 6 * group.dim
                   for r, group in zip(self.resolutions, self.top_down))

    def bottom_up_features(self, x: Tensor, y: Tensor | None = None) -> list[Tensor]:
        """The feature map at each group's resolution (B, C, r_h, r_w), top group first."""
        self.condition(y)
        h = self.input_layer(x.to(self.top_state.dtype))  # (B, C, H, W)
        fine_map = self.bottom_up[0](h)  # (B, C, fine)
        coarse_map = self.bottom_up[1](fine_map)  # (B, C, coarse)
        return [coarse_map if i < self.coarse_groups else fine_map
                for i in range(len(self.top_down))]

    def initial_state(self, batch_shape: tuple[int, ...], condition: Tensor | None,
                      like: Tensor) -> Tensor:
        """s_0 (..., B, C, coarse): the learned start."""
        return self.top_state.expand(*batch_shape, *self.top_state.shape)

    def code_of(self, state: Tensor) -> Tensor:
        """The decoder's code: the last state flattened. (..., C * h * w)"""
        return state.flatten(-3)


def build_conv_hierarchical_vae(config) -> ConvHierarchicalVAE:
    from .distributions import build_likelihood

    if config.num_classes:
        raise ValueError("a convolutional hierarchy is unconditional: drop --conditional, or "
                         "use --net mlp for a conditional hierarchy")
    channels = config.conv_channels[-1] if config.conv_channels else DEFAULT_CHANNELS
    data_shape = tuple(config.data_shape)
    likelihood = build_likelihood(config.likelihood, data_shape, config.gaussian_scale,
                                  config.likelihood_components)
    return ConvHierarchicalVAE(data_shape, list(config.latent_groups), channels, likelihood,
                               config.activation)
