"""A hierarchical VAE with top-down inference: L groups of latents z_1 (top) ... z_L (bottom).

    generation   s_0 = s (learned)                     [+ the class label y, projected]
                 for l = 1 .. L:  z_l ~ p(z_l | s_{l-1}),  s_l = s_{l-1} + merge_l(s_{l-1}, z_l)
                 x ~ p(x | s_L)
    inference    h_L, ..., h_1 = the bottom-up features of x (h_1 the deepest)
                 q(z_l | x, z_<l) = N(mu_p + d_mu(h_l, s_{l-1}), sigma_p * exp(d_rho(h_l, s_{l-1})))

The prior of the top group is N(0, I); every lower group's prior p(z_l | z_<l) is learned from
the top-down state. Inference shares the top-down path with generation (Sønderby et al. 2016,
Ladder VAE), and each posterior is parameterised relative to its prior (Vahdat & Kautz 2020,
NVAE's residual normal distributions), so an untrained posterior is near its prior and the
groups' KLs start small. Scales are bounded, exp(5 tanh(./5)), so no group can blow up a draw or
a log-density in one update (the posterior's log-scale, its prior's plus a learned shift, is
bounded as a whole). The decoder reads the last top-down state s_L: that is the code of
latent.py, made by the model from the groups' draws.

The model speaks latent.py's interface, so training, every objective, importance sampling and
exact resume work unchanged: `infer(x).draw(eps)` runs the top-down pass from noise eps
(..., B, sum_l D_l), split top group first. The ELBO's KL of each group is closed form given the
groups above it (both Gaussians): KL(q(z_l | x, z_<l) || p(z_l | z_<l)) at the drawn z_<l.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .latent import Inference, LatentDraw, LatentGroup, split_noise
from .model import LatentModel, _full_precision
from .nets import MLPDecoder, activation, join_condition
from .posteriors import DiagonalGaussian

# log-scales of every prior and every posterior stay within +-5 (scales e^-5 .. e^5)
LOG_SCALE_LIMIT = 5.0
MAX_GROUPS = 64  # a model of more groups than this is a typing error, not a hierarchy


def bounded_log_scale(raw: Tensor) -> Tensor:
    """A smooth clamp of a log-scale to +-LOG_SCALE_LIMIT; 0 at 0, slope 1 there."""
    return LOG_SCALE_LIMIT * torch.tanh(raw / LOG_SCALE_LIMIT)


def diagonal_normal(loc: Tensor, log_scale: Tensor) -> DiagonalGaussian:
    return DiagonalGaussian(loc, log_scale.exp())


def expanded(normal: DiagonalGaussian, batch: torch.Size) -> DiagonalGaussian:
    """The same Gaussian with batch shape `batch` (its parameters broadcast: views)."""
    if normal.batch_shape == batch:
        return normal
    base = normal.base_dist
    shape = (*batch, *normal.event_shape)
    return DiagonalGaussian(base.loc.expand(shape), base.scale.expand(shape))


class ResidualBlock(nn.Module):
    """x + W2 act(W1 act(x)): a residual cell of constant width (layer: nn.Linear for the MLP,
    a 3x3 convolution for images). The second layer starts at a 1 / sqrt(depth) share of its
    usual size, so a deep stack starts near the identity (VDVAE)."""

    def __init__(self, width: int, act: str, depth: int, layer=nn.Linear):
        super().__init__()
        self.first = layer(width, width)
        self.second = layer(width, width)
        self.act = activation(act)
        with torch.no_grad():
            self.second.weight.mul_(1 / math.sqrt(depth))
            self.second.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.second(self.act(self.first(self.act(x))))


class TopDownGroup(nn.Module):
    """One group of the top-down path: its prior, its posterior relative to that prior, and the
    merge of its draw into the state."""

    def __init__(self, dim: int, width: int, act: str, top: bool, depth: int):
        super().__init__()
        self.dim, self.top = dim, top
        # the prior of z_l from the state (the top group's is N(0, I): no network)
        self.prior_net = None if top else nn.Sequential(
            nn.Linear(width, width), activation(act, fresh_input=True), nn.Linear(width, 2 * dim))
        # the posterior's shift from the prior, from the bottom-up feature and the state; the
        # feature's part is computed once per batch (`features`), the state's once per draw
        self.from_feature = nn.Linear(width, width)
        self.from_state = nn.Linear(width, width, bias=False)
        self.posterior_out = nn.Linear(width, 2 * dim)
        self.act = activation(act, fresh_input=True)  # on fresh sums and layer outputs only
        # the state takes in z_l
        self.merge_in = nn.Linear(width + dim, width)
        self.merge_out = nn.Linear(width, width)
        with torch.no_grad():
            self.merge_out.weight.mul_(1 / math.sqrt(depth))
            self.merge_out.bias.zero_()
            # a posterior that starts near its prior: small shifts, scale ratios near 1
            self.posterior_out.weight.mul_(0.1)
            self.posterior_out.bias.zero_()

    def prior(self, state: Tensor) -> DiagonalGaussian:
        """p(z_l | z_<l) from the state (..., B, W); the top group's N(0, I). event (D_l,)"""
        if self.top:
            zeros = state.new_zeros(*state.shape[:-1], self.dim)  # (..., B, D_l)
            return diagonal_normal(zeros, zeros)
        # float32 under bf16 autocast: densities and KLs need its mantissa (as model.py's)
        loc, raw = _full_precision(self.prior_net(state)).chunk(2, dim=-1)  # (..., B, D_l)
        return diagonal_normal(loc, bounded_log_scale(raw))

    def features(self, h: Tensor) -> Tensor:
        """The bottom-up feature's share of the posterior network. (B, W)"""
        return self.from_feature(h)

    def posterior(self, feature: Tensor, state: Tensor,
                  prior: DiagonalGaussian) -> DiagonalGaussian:
        """q(z_l | x, z_<l): the prior shifted and rescaled (NVAE's residual normal)."""
        hidden = self.act(feature + self.from_state(state))  # (..., B, W)
        shift, raw = _full_precision(self.posterior_out(hidden)).chunk(2, dim=-1)  # (..., B, D_l)
        normal = prior.base_dist
        return diagonal_normal(normal.loc + shift,
                               bounded_log_scale(normal.scale.log() + raw))

    def merge(self, state: Tensor, z: Tensor) -> Tensor:
        """s_l = s_{l-1} + merge(s_{l-1}, z_l). (..., B, W)"""
        if state.shape[:-1] == z.shape[:-1]:
            joined = self.merge_in(torch.cat([state, z], dim=-1))  # (..., B, W)
        else:  # one state for many draws (the top group's start): its share is computed once
            width = state.shape[-1]
            weight = self.merge_in.weight  # (W, W + D_l): the state's columns, then z's
            joined = F.linear(state, weight[:, :width], self.merge_in.bias) \
                + F.linear(z, weight[:, width:])  # (1.., [B], W) + (..., B, W)
        return state + self.merge_out(self.act(joined))


class HierarchicalVAE(LatentModel):
    """L groups of latents, generated top-down and inferred along the same path; see the module
    docstring. groups: the sizes D_1 (top) ... D_L (bottom); width: the state's and the
    bottom-up features' size W."""

    def __init__(self, data_shape: tuple[int, ...], groups: list[int], width: int,
                 decoder_hidden: list[int], likelihood: nn.Module, act: str = "relu",
                 num_classes: int | None = None):
        super().__init__()
        if not 1 <= len(groups) <= MAX_GROUPS or any(d < 1 for d in groups):
            raise ValueError(f"latent groups must be 1 to {MAX_GROUPS} positive sizes, got "
                             f"{groups}")
        depth = len(groups)
        condition = num_classes or 0
        self.groups_sizes = list(groups)
        self.width = width
        self.num_classes = num_classes
        self.likelihood = likelihood
        # bottom-up: x [+ y] -> W, then one residual block per group above the bottom one
        self.input_layer = nn.Linear(math.prod(data_shape) + condition, width)
        self.bottom_up = nn.ModuleList(ResidualBlock(width, act, depth)
                                       for _ in range(depth - 1))
        self.top_state = nn.Parameter(torch.zeros(width))
        self.condition_in = nn.Linear(condition, width, bias=False) if condition else None
        self.top_down = nn.ModuleList(TopDownGroup(dim, width, act, top=index == 0, depth=depth)
                                      for index, dim in enumerate(groups))
        # the decoder reads the last state [+ y], as the flat VAE's reads z [+ y]
        self.decoder = MLPDecoder(width, decoder_hidden, likelihood.params_shape, act,
                                  condition)

    # --- the latent interface (latent.py) ----------------------------------------------------
    @property
    def latent_groups(self) -> tuple[tuple[str, int], ...]:
        return tuple((f"z{index + 1}", dim) for index, dim in enumerate(self.groups_sizes))

    @property
    def latent_dim(self) -> int:
        return sum(self.groups_sizes)

    @property
    def code_dim(self) -> int:
        return self.width  # the decoder reads the last top-down state

    @property
    def inference_elements_per_sample(self) -> int:
        """Numbers one draw's top-down pass holds (per group: the prior's and the posterior's
        hidden units and outputs, the merge's, the state): what estimators budget for."""
        return sum(6 * self.width + 6 * dim for dim in self.groups_sizes)

    def bottom_up_features(self, x: Tensor, y: Tensor | None = None) -> list[Tensor]:
        """h_1 (deepest) ... h_L (shallowest) of a batch x, each (B, W): one per group."""
        h = self.input_layer(join_condition(x.flatten(1), self.condition(y)))  # (B, W)
        features = [h]
        for block in self.bottom_up:
            h = block(h)
            features.append(h)
        return features[::-1]  # the top group reads the deepest feature

    def initial_state(self, batch_shape: tuple[int, ...], condition: Tensor | None,
                      like: Tensor) -> Tensor:
        """s_0 (..., B, W): the learned start [+ the label's projection], in the model's dtype."""
        state = self.top_state.expand(*batch_shape, self.width)
        if condition is not None:
            state = state + self.condition_in(condition)  # (B, W) broadcast over samples
        return state

    def code_of(self, state: Tensor) -> Tensor:
        """The decoder's code from the last top-down state: the state itself. (..., B, W)"""
        return state

    def infer(self, x: Tensor, y: Tensor | None = None) -> "TopDownInference":
        features = [group.features(h) for group, h in
                    zip(self.top_down, self.bottom_up_features(x, y))]
        return TopDownInference(self, features, self.condition(y))

    def prior_draws(self) -> "TopDownPrior":
        return TopDownPrior(self)

    def generate(self, eps: Tensor, y: Tensor | None = None) -> Tensor:
        """The code s_L of top-down draws from the prior made of noise eps (..., B, D)."""
        return self.prior_draws().code(eps, condition=self.condition(y))

    def sample_codes(self, n: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None,
                     y: Tensor | None = None) -> Tensor:
        """n codes from the prior with every group's noise scaled by `temperature`: z_l =
        mu_p + T sigma_p eps (NVAE and VDVAE show samples so). (n, code_dim)"""
        check_temperature(temperature)
        eps = torch.randn(n, self.latent_dim, generator=generator)  # (n, D)
        return self.generate(temperature * eps.to(self.top_state), y)

    def prior_variance(self) -> Tensor:
        """Var_p(z_d) of every coordinate (D,): the top group's 1, the lower groups' marginal
        variance estimated from 4,096 top-down draws of fixed noise (no closed form), in
        blocks of 256 draws."""
        generator = torch.Generator().manual_seed(0)
        eps = torch.randn(4096, self.latent_dim, generator=generator).to(self.top_state)
        with torch.no_grad():
            draws = torch.cat([self.prior_draws().latents(block)
                               for block in eps.split(256)])  # (4096, D)
        return draws.var(0)

    def point_code(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The code with every group at its posterior mean, top-down. (B, code_dim)"""
        zeros = x.new_zeros(len(x), self.latent_dim)  # eps = 0: each group at its mean
        return self.infer(x, y).draw(zeros).code


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"a temperature must be a number >= 0, got {temperature}")


class TopDownInference(Inference):
    """q(z | x) of a batch: the bottom-up features computed once; each draw runs the top-down
    path, group by group, from its noise."""

    def __init__(self, model: HierarchicalVAE, features: list[Tensor],
                 condition: Tensor | None):
        self.model, self.features, self.condition = model, features, condition

    def draw(self, eps: Tensor, inferred_groups: int | None = None) -> LatentDraw:
        """A draw of every group from noise eps (..., B, D). inferred_groups=m draws only the top
        m groups from q and every group below them from its prior given the groups above
        (q_l = p_l there, so those groups add no KL): the proposal of Havtorn et al. 2021's
        bound L^{>k} that skips the lowest k = L - m groups."""
        model = self.model
        eps = eps.to(model.top_state.dtype)  # float32 noise for a float64 model, as estimators make
        noise = split_noise(eps, model.groups_sizes)
        batch = eps.shape[:-1]  # (..., B)
        # One start for every draw, not expanded: the top group's prior and posterior depend on
        # x alone, so they are computed once per example (1.., B) instead of once per draw (an
        # importance sampler's K draws share them), and broadcast where the draws meet them.
        state = model.initial_state((1,) * len(batch), self.condition, eps)  # (1.., [B], W)
        inferred = len(model.groups_sizes) if inferred_groups is None else inferred_groups
        groups = []
        for index, ((name, _), group, feature, group_eps) in enumerate(zip(
                model.latent_groups, model.top_down, self.features, noise)):
            prior = group.prior(state)  # p(z_l | z_<l), batch (..., B) or (1.., [B])
            # q(z_l | x, z_<l), or the prior itself for a skipped group
            q = group.posterior(feature, state, prior) if index < inferred else prior
            normal = q.base_dist
            z = normal.loc + normal.scale * group_eps  # (..., B, D_l)
            groups.append(LatentGroup(name, z, group_eps, expanded(q, batch),
                                      expanded(prior, batch)))
            state = group.merge(state, z)
        return LatentDraw(groups, code=model.code_of(state))


@dataclass
class TopDownPrior:
    """Top-down draws from the prior made of noise: z_l = mu_p + sigma_p eps_l, group by group."""

    model: HierarchicalVAE
    needs_choice: bool = False

    def _run(self, eps: Tensor, condition: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        model = self.model
        eps = eps.to(model.top_state.dtype)
        # one start for every draw, broadcast where the draws meet it (as TopDownInference.draw)
        state = model.initial_state((1,) * (eps.dim() - 1), condition, eps)  # (1.., [B], W)
        draws = []
        for group, group_eps in zip(model.top_down, split_noise(eps, model.groups_sizes)):
            normal = group.prior(state).base_dist
            z = normal.loc + normal.scale * group_eps  # (..., B, D_l)
            draws.append(z)
            state = group.merge(state, z)
        return state, draws

    def code(self, eps: Tensor, choice: Tensor | None = None,
             condition: Tensor | None = None) -> Tensor:
        """The decoder's code of the draws made of eps (..., B, D). (..., B, code_dim)"""
        return self.model.code_of(self._run(eps, condition)[0])

    def latents(self, eps: Tensor, condition: Tensor | None = None) -> Tensor:
        """Every group's draw, side by side (..., B, D)."""
        return torch.cat(self._run(eps, condition)[1], dim=-1)


class GroupView(nn.Module):
    """A hierarchical VAE seen through one of its groups z_l, as a single-latent model: what
    latent steering (traverse, manifold, interpolate, embed, the explorer) reads.

    The group is steered in its prior's own coordinates, u = (z_l - mu_p) / sigma_p, where
    p(z_l | z_<l) = N(mu_p, sigma_p^2): the prior of u is then N(0, I) whatever the groups above
    are, and the KL of each coordinate of q is unchanged by the map, so every picture and
    figure of a single-latent model holds (the top group's prior is N(0, I): u is z_1 itself).

        encode(x)   q(u | x)   the group's posterior given x's own groups above at their
                               posterior means, in the prior's coordinates
        prior       N(0, I)
        decode(u)   p(x | the groups above at the context, z_l = mu_p + sigma_p u, every group
                    below at its prior mean given the groups above, or drawn with detail noise)

    The context is the groups above, fixed for every decode: at one example's posterior means
    (context_x, a batch of one model input), or at their prior means (None).
    """

    def __init__(self, model: HierarchicalVAE, index: int = 0, context_x: Tensor | None = None):
        super().__init__()
        from .distributions import StandardNormalPrior

        if model.conditional:
            raise ValueError("a conditional hierarchy's groups depend on the label: its groups "
                             "are not steered alone (latent steering takes unconditional runs)")
        if not 0 <= index < len(model.groups_sizes):
            names = ", ".join(name for name, _ in model.latent_groups)
            raise ValueError(f"the hierarchy has no group number {index + 1}: its groups are "
                             f"{names}")
        self.hierarchy, self.index = model, index
        self.prior_module = StandardNormalPrior(model.groups_sizes[index]).to(model.top_state)
        self.num_classes = None
        with torch.no_grad():
            if context_x is None:
                state = self._state_above(model.initial_state((1,), None, model.top_state),
                                          None)  # (1, W)
            else:
                state = self._state_above(model.initial_state((1,), None, context_x),
                                          self._features(context_x))
        self.register_buffer("context_state", state[0], persistent=False)  # (W,)

    @property
    def name(self) -> str:
        return self.hierarchy.latent_groups[self.index][0]

    @property
    def latent_dim(self) -> int:
        return self.hierarchy.groups_sizes[self.index]

    @property
    def prior(self):
        return self.prior_module()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.hierarchy.data_shape

    @property
    def detail_dim(self) -> int:
        """Dimensions of the groups below this one: the detail `decode` can redraw."""
        return sum(self.hierarchy.groups_sizes[self.index + 1:])

    def _features(self, x: Tensor) -> list[Tensor]:
        model = self.hierarchy
        return [group.features(h) for group, h in
                zip(model.top_down[:self.index + 1], model.bottom_up_features(x))]

    def _state_above(self, state: Tensor, features: list[Tensor] | None) -> Tensor:
        """The state after the groups above this one, each at its posterior mean given the
        features (or its prior mean without them). (..., W)"""
        for index, group in enumerate(self.hierarchy.top_down[:self.index]):
            prior = group.prior(state)
            mean = prior if features is None else group.posterior(features[index], state, prior)
            state = group.merge(state, mean.base_dist.loc)
        return state

    def encode(self, x: Tensor, y: Tensor | None = None) -> DiagonalGaussian:
        """q(u | x) in the group's prior coordinates. batch (B,), event (D_l,)"""
        model = self.hierarchy
        features = self._features(x)
        state = self._state_above(model.initial_state((len(x),), None, x), features)  # (B, W)
        group = model.top_down[self.index]
        prior = group.prior(state)
        q = group.posterior(features[self.index], state, prior).base_dist
        p = prior.base_dist
        if self.index == 0:  # N(0, I): u is z_1, bit for bit
            return DiagonalGaussian(q.loc, q.scale)
        return DiagonalGaussian((q.loc - p.loc) / p.scale, q.scale / p.scale)

    def decode(self, u: Tensor, y: Tensor | None = None, detail: Tensor | None = None):
        """p(x | u) with the context above and the groups below at their prior means given the
        groups above, or, with detail noise (..., detail_dim), drawn from those priors: z =
        mu_p + sigma_p eps (a temperature is the noise's scale). u (..., D_l)"""
        model = self.hierarchy
        state = self.context_state.expand(*u.shape[:-1], *self.context_state.shape)  # (..., W)
        group = model.top_down[self.index]
        prior = group.prior(state).base_dist
        z = u if self.index == 0 else prior.loc + prior.scale * u  # (..., D_l)
        state = group.merge(state, z)
        below = model.groups_sizes[self.index + 1:]
        noise = split_noise(detail, below) if detail is not None else None
        for offset, lower in enumerate(model.top_down[self.index + 1:]):
            normal = lower.prior(state).base_dist
            draw = normal.loc if noise is None else normal.loc + normal.scale * noise[offset]
            state = lower.merge(state, draw)
        return model.decode(model.code_of(state))


class TopGroupView(GroupView):
    """The hierarchy seen through its top group z_1 (prior N(0, I)), with the lower groups at
    their prior means given the groups above: what latent steering reads by default."""

    def __init__(self, model: HierarchicalVAE):
        super().__init__(model, 0)

    @property
    def encoder(self) -> nn.ModuleList:
        """The modules q(z1 | x) is computed by (the bottom-up path and the top group's
        posterior network), for what differentiates the encoder alone."""
        model, top = self.hierarchy, self.hierarchy.top_down[0]
        return nn.ModuleList([model.input_layer, model.bottom_up, top.from_feature,
                              top.from_state, top.posterior_out])


def group_index(model: HierarchicalVAE, name: str) -> int:
    """The index of the group called `name` (z1 is the top group)."""
    names = [group for group, _ in model.latent_groups]
    if name not in names:
        raise ValueError(f"--group {name}: this hierarchy's groups are {', '.join(names)} "
                         "(z1 the top group)")
    return names.index(name)


def single_latent_view(model: nn.Module) -> nn.Module:
    """A model as one latent group: a hierarchy's TopGroupView, any other model itself."""
    return TopGroupView(model) if isinstance(model, HierarchicalVAE) else model


def build_hierarchical_vae(config) -> HierarchicalVAE:
    """The hierarchical VAE of a ModelConfig with latent_groups set (MLP nets)."""
    from .distributions import build_likelihood

    if config.prior != "normal" or config.posterior not in ("auto", "gaussian"):
        raise ValueError("--latent-groups has its own priors and posteriors (a standard normal "
                         "top group, learned Gaussians below it, posteriors relative to them): "
                         "use --prior normal and --posterior auto")
    if config.net == "conv":
        from .conv_hierarchy import build_conv_hierarchical_vae

        return build_conv_hierarchical_vae(config)
    if not config.hidden:
        raise ValueError("--latent-groups needs --hidden: its first size is the width of the "
                         "hierarchy's state, for example --hidden 400")
    data_shape = tuple(config.data_shape)
    likelihood = build_likelihood(config.likelihood, data_shape, config.gaussian_scale,
                                  config.likelihood_components)
    return HierarchicalVAE(data_shape, list(config.latent_groups), config.hidden[0],
                           list(config.hidden), likelihood, config.activation,
                           config.num_classes)

