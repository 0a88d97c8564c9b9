"""The approximation class in `vaekit explain`: how the family of q(z|x) decides the ELBO gap.

The note's points 13-14: log p(x) = ELBO + KL(q(z|x) || p(z|x)), and the family q is chosen
from decides how small that KL can be. Shown twice:

1. On the linear-Gaussian oracle with a correlated posterior (exact numbers): a diagonal q
   fitted to its best stops at the least gap any diagonal Gaussian can reach; a full-covariance
   q closes it (oracle.posterior_gaps).
2. On the run itself: the run's decoder, prior and likelihood kept as they are (so p(x) is the
   same model for every row), a fresh encoder of the run's own architecture is fitted for each
   family (diagonal, full-covariance, IAF) by the ELBO on training examples, and each is scored
   on the same test examples by importance sampling and by its ELBO from the same draws. The
   importance-sampled log p(x) of every row estimates the same number; the ELBOs differ by the
   gap each family leaves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .estimate import evaluate
from .objectives import elbo_terms
from .randomness import derive_seed, seeded_generator

FAMILIES = ("gaussian", "full-covariance", "iaf")
FIT_BATCH = 128


@dataclass
class FamilyScore:
    name: str
    log_px: Tensor  # (N,) importance-sampled, nats in the data's units
    elbo: Tensor  # (N,) from the same draws

    @staticmethod
    def _mean_and_se(values: Tensor) -> tuple[float, float]:
        values = values.double()
        return float(values.mean()), float(values.std() / math.sqrt(max(len(values), 1)))

    def summary(self, reference: "FamilyScore") -> list[str]:
        log_px, log_px_se = self._mean_and_se(self.log_px)
        elbo, _ = self._mean_and_se(self.elbo)
        gap, gap_se = self._mean_and_se(self.log_px - self.elbo)
        if reference is self:
            versus = "(reference)"
        else:
            difference, se = self._mean_and_se((self.log_px - self.elbo)
                                               - (reference.log_px - reference.elbo))
            versus = f"{difference:+.2f} ± {se:.2f}"
        return [self.name, f"{log_px:.2f} ± {log_px_se:.2f}", f"{elbo:.2f}",
                f"{gap:.2f} ± {gap_se:.2f}", versus]


def refit_posterior(run, family: str, train_raw: Tensor, *, steps: int, seed: int):
    """A model with the run's decoder, prior and likelihood, frozen, and a fresh encoder of the
    run's architecture whose posterior is `family`, trained alone by the one-sample ELBO (Adam,
    the run's learning rate) for `steps` batches of training examples."""
    from .model import build_vae
    from .runs import model_config_for

    model_config = model_config_for(run.config, tuple(run.data["shape"]),
                                    run.data["label_names"])
    model_config = dataclasses.replace(model_config, posterior=family, flow_steps=None)
    device = next(run.model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "refit", family))
        model = build_vae(model_config).to(device)
    for name in ("decoder", "likelihood", "prior_module"):
        getattr(model, name).load_state_dict(getattr(run.model, name).state_dict())
        getattr(model, name).requires_grad_(False)
    trained = [p for p in list(model.encoder.parameters()) + list(model.posterior.parameters())
               if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=run.config.lr)
    generator = seeded_generator(derive_seed(seed, "refit-order", family))
    for _ in range(steps):
        rows = torch.randint(len(train_raw), (FIT_BATCH,), generator=generator)
        raw = train_raw[rows].to(device)  # (b, *shape)
        u = torch.rand(raw.shape, generator=generator).to(device) if run.pipeline.noisy \
            else None  # fresh binarisation or dequantisation noise, as training draws it
        x = run.pipeline.apply(raw, u)
        eps = torch.randn(FIT_BATCH, model.latent_dim, generator=generator).to(device)
        loss = -elbo_terms(model, x, eps).elbo.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def compare_families(run, dataset, *, examples: int, k: int, steps: int, seed: int,
                     log=print) -> list[FamilyScore]:
    """The run's own q and a refitted q of each family, scored on the same test examples."""
    raw = dataset.test_x[:examples]
    scores = []

    def score(name: str, model) -> None:
        result = evaluate(model, raw, run.pipeline, k=k, seed=seed, naive=False)
        scores.append(FamilyScore(name, result.per_example["log_px"]
                                  + run.pipeline.log_jacobian,
                                  result.per_example["elbo"] + run.pipeline.log_jacobian))

    from .names import resolve_posterior

    own = resolve_posterior(run.config.posterior, run.config.prior)
    score(f"the run's own ({own}, trained with the decoder)", run.model)
    for family in FAMILIES:
        log(f"explain: points 13-14, a {family} q(z|x) fitted to this run's decoder "
            f"({steps} steps)")
        score(f"{family}, refitted", refit_posterior(run, family, dataset.train_x,
                                                    steps=steps, seed=seed))
    return scores


def section_approximation(run, dataset, *, examples: int, k: int, steps: int, seed: int,
                          log=print):
    from . import oracle
    from .report import Section

    section = Section("points-13-14", "Points 13-14: the approximation class decides the gap")
    section.paragraphs.append(
        "The ELBO falls short of log p(x) by exactly KL(q(z|x) || p(z|x)): how far the "
        "approximate posterior is from the true one. How small that can be is decided by the "
        "family q is chosen from. First on a model whose answers are known exactly, a "
        "linear-Gaussian model whose true posterior has correlated coordinates; each encoder "
        "is fitted to the best of its family on the same data and decoder:")
    gaps = oracle.posterior_gaps()
    section.paragraphs.append(
        f"the diagonal Gaussian's gap stops at {gaps['gaussian']:.4f} nats, the least any "
        f"diagonal Gaussian can reach ({gaps['diagonal bound']:.4f}, "
        "(&Sigma; log M<sub>dd</sub> &minus; log det M) / 2 for the posterior precision M); "
        f"the full-covariance Gaussian's gap is {gaps['full-covariance']:.1e} nats: none.")
    if run.config.latent_groups or run.config.prior not in ("normal", "mixture"):
        what = "a hierarchical run" if run.config.latent_groups else \
            f"a run with the {run.config.prior} prior"
        section.paragraphs.append(
            f"This is {what}, whose posterior family is fixed by its prior or structure, so no "
            "other family is refitted to it here.")
        return section
    scores = compare_families(run, dataset, examples=examples, k=k, steps=steps, seed=seed,
                              log=log)
    section.paragraphs.append(
        f"Then on this run: its decoder, prior and likelihood kept as they are, so every row "
        f"below is the same p(x); a fresh encoder of this run's architecture is fitted for "
        f"each family by the ELBO alone ({steps} batches of {FIT_BATCH} training examples), "
        f"and each is scored on the same {len(scores[0].log_px)} test examples by importance "
        f"sampling (k = {k}) and by its ELBO from the same draws. The log p(x) column "
        "estimates one number in every row (rows far apart mean some q misses part of the "
        "posterior, which importance sampling then cannot repair at this k); the gap column "
        "is what each family leaves. The refitted encoders had far fewer steps than the run's "
        "own, so compare them with each other.")
    reference = scores[1]  # the refitted diagonal Gaussian
    section.table = [["q(z|x)", "log p(x), IS", "ELBO", "gap log p(x) - ELBO",
                      "gap - refitted diagonal's (paired)"]]
    section.table += [score.summary(reference) for score in scores]
    return section
