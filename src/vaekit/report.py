"""Reports on a trained run: the evaluation table (`vaekit evaluate`) and the note's
demonstrations as a self-contained HTML page (`vaekit explain`).

Everything shown is computed here on the run's own model and data by the estimators of
estimate.py; this module only arranges numbers, charts (plot.Chart) and images (viz) into text.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from .estimate import log_mean_exp, log_weights
from .gradients import gradient_variance
from .plot import Chart
from .runs import read_metrics  # noqa: F401 (also importable from here, as before)
from .viz import (
    curves_image,
    image_grid,
    is_image_shape,
    png_bytes,
    save_png,
    stack_vertically,
    titled,
)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _fmt_se(value: float | None) -> str:
    """A standard error to two significant figures."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2g}"


NAIVE_ESS = 2.0  # below this mean effective sample size the naive estimator's s.e. means nothing


def evaluation_table(result: dict) -> str:
    """The evaluation object (estimate.evaluate_run) as a readable table."""
    k, n = result["k"], result["n"]
    lines = [
        f"vaekit evaluate {result['run']}: {result['split']} split, {n:,} examples, seed "
        f"{result['seed']} ({result['seconds']:.0f} s on {result['device']}"
        + (f" x {result['processes']} processes" if result.get("processes", 1) > 1 else "")
        + ")",
        f"log p(x) is the likelihood of: {result['likelihood_of']}",
        "",
        f"{'':44}{'nats/example':>14}{'s.e.':>9}   samples per example",
    ]

    def row(label: str, value, se, samples: str = "", digits: int = 2) -> None:
        se_text = se if isinstance(se, str) else _fmt_se(se)
        lines.append(f"{label:44}{_fmt(value, digits):>14}{se_text:>9}   {samples}".rstrip())

    row("log p(x)  importance sampled (IWAE bound)", result["log_px"], result["log_px_se"],
        f"k = {k} from q(z|x), mean ESS {result['log_px_ess']:,.1f}")
    if result.get("log_px_jackknife") is not None:
        row("  jackknife, O(1/k) bias removed", result["log_px_jackknife"],
            result["log_px_jackknife_se"], f"the same k = {k}, 64 blocks")
    naive_meaningless = "log_px_naive" in result and result["log_px_naive_ess"] < NAIVE_ESS
    if "log_px_naive" in result:
        row("log p(x)  naive, z from the prior", result["log_px_naive"],
            "n/a" if naive_meaningless else result["log_px_naive_se"],
            f"k = {k} from p(z), mean ESS {result['log_px_naive_ess']:,.1f}")
    row("ELBO", result["elbo"], result["elbo_se"], f"the same k = {k} from q(z|x)")
    row("  reconstruction  E_q[log p(x|z)]", result["reconstruction"],
        result["reconstruction_se"], f"k = {k}")
    row("  KL(q(z|x) || p(z))", result["kl"], "exact" if result["kl_exact"] else result["kl_se"],
        "closed form" if result["kl_exact"] else f"k = {k}")
    row("ELBO gap  log p(x) - ELBO = KL(q || p(z|x))", result["elbo_gap"], result["elbo_gap_se"],
        f"k = {k}")
    if "bits_per_dim" in result:
        row("bits per dimension  -log2 p(x) / dims", result["bits_per_dim"],
            result["bits_per_dim_se"], f"k = {k}", digits=4)
    lines.append(f"{'active units  (Cov_x E_q[z_d] > 0.01 var p)':44}"
                 f"{result['active_units']:>8} of {result['latent_dim']:<4}"
                 f"   {n:,} examples")
    per_dim = result["kl_per_dim"]
    for group in result.get("latent_groups", []):
        kl = "not defined" if group["kl"] is None else f"{group['kl']:.2f} nats"
        lines.append(f"group {group['name']} ({group['dims']} dimensions): KL {kl}, "
                     f"{group['active_units']} of {group['dims']} units active")
    if all(isinstance(v, (int, float)) and math.isfinite(v) for v in per_dim):
        lines.append("KL per latent dimension (nats): " + " ".join(f"{v:.2f}" for v in per_dim))
    else:
        lines.append("KL per latent dimension: not defined (q(z|x) or p(z) does not factorise "
                     "over dimensions; the KL above is of all of z)")
    lines.append("s.e.: from replicates of disjoint groups of the draws (the delta method's "
                 f"would say {_fmt_se(result.get('log_px_se_delta', math.nan)).strip()} for "
                 "log p(x))")
    rise = result.get("log_px_last_doubling_rise")
    if rise is not None:
        lines.append(f"the last doubling of k ({k // 2:,} -> {k:,}) raised log p(x) by "
                     f"{rise:,.3f} nats; the jackknife estimates what is left")
    if "pareto_k_high" in result:
        limit, high = result["pareto_k_threshold"], result["pareto_k_high"]
        worst = result.get("pareto_k_max")
        worst = "" if worst is None else f", largest {worst:.2f}"
        if high:
            lines.append(f"warning: {high:,} of {n:,} examples have importance weights with a "
                         f"Pareto k above {limit:.2f}{worst}: their estimates are not to be "
                         "trusted (q(z|x) misses their posterior's tail); see pareto_k in "
                         "evaluation.json")
        else:
            lines.append(f"Pareto k of every example's weights is at most {limit:.2f}{worst}: "
                         "the importance-sampling estimates can be trusted")
    if "log_px_naive" in result:
        diff = result["log_px"] - result["log_px_naive"]
        se = math.hypot(result["log_px_se"], result["log_px_naive_se"])
        lines.append(f"naive vs importance sampling at equal k: {diff:,.2f} nats apart"
                     + (f" ({diff / se:,.0f} standard errors)"
                        if se > 0 and not naive_meaningless else ""))
        if naive_meaningless:
            lines.append(f"note: the naive estimator's effective sample size is "
                         f"{result['log_px_naive_ess']:.1f} of {k}: one prior draw carries all "
                         "the weight of nearly every example, so no error bar is meaningful "
                         "and none is shown")
        elif result["log_px_naive_ess"] < 10:
            lines.append(f"note: the naive estimator's effective sample size is "
                         f"{result['log_px_naive_ess']:.1f} of {k}: one prior draw carries nearly "
                         "all the weight, so its standard error understates its real error")
    low = result.get("log_px_low_ess", 0)
    if low and k >= 20:
        lines.append(f"note: {low:,} of {n:,} examples have importance weights with an effective "
                     f"sample size below 10 (lowest {result['log_px_ess_min']:.1f}): a few draws "
                     "carry their estimate, so their log p(x) may be too low and its error bar too "
                     "small (q(z|x) is narrower than, or off, their posterior); a larger --k helps "
                     "only slowly")
    if "sample_quality" in result:
        from .sample_report import sample_quality_table

        lines += ["", sample_quality_table(result["sample_quality"])]
    return "\n".join(lines)



# ------------------------------------------------------------------------------------------------
# `vaekit explain`: the note's demonstrations on a trained run

K_GRID = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


@dataclass
class Figure:
    name: str  # the PNG is saved as RUN_DIR/explain-NAME.png
    image: object  # a PIL image
    caption: str


@dataclass
class Section:
    anchor: str
    title: str
    paragraphs: list[str] = field(default_factory=list)  # HTML, already escaped
    figures: list[Figure] = field(default_factory=list)
    table: list[list[str]] | None = None  # the first row is the header (plain text)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _pm(value: float, se: float, digits: int = 2) -> str:
    """value ± se as plain text (just the value where the error is undefined)."""
    if se is None or not math.isfinite(se):
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} ± {_fmt(se, digits)}"


def _finite_or_zero(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else 0.0 for v in values]


def _mean_and_se(estimates: Tensor, variances: Tensor) -> tuple[float, float]:
    """Mean over examples of per-example estimates and its Monte Carlo standard error."""
    n = len(estimates)
    return float(estimates.mean()), float(variances.sum().sqrt() / n)


# --- point 10: a shifted digit against a damaged one ---------------------------------------------


def _background(images: Tensor) -> Tensor:
    """Per image, the median of its border pixels: the value a shift or an erasure fills in."""
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0],
                        images[:, :, :, -1]], dim=-1)  # (n, C, 2H + 2W)
    return border.flatten(1).float().median(dim=1).values  # (n,)


def shift_right(images: Tensor, pixels: int) -> Tensor:
    """Images (n, C, H, W) moved `pixels` to the right, the uncovered columns filled with the
    background."""
    fill = _background(images).to(images.dtype)
    shifted = torch.roll(images, shifts=pixels, dims=-1).clone()
    shifted[..., :pixels] = fill.view(-1, 1, 1, 1)
    return shifted


def erase_patch(images: Tensor, size: int) -> Tensor:
    """Images (n, C, H, W) with a size x size square set to the background, placed where it
    removes the most ink (a small piece cut away from the digit)."""
    fill = _background(images)
    ink = (images.float() - fill.view(-1, 1, 1, 1)).abs().sum(1, keepdim=True)  # (n, 1, H, W)
    mass = torch.nn.functional.avg_pool2d(ink, size, stride=1)  # (n, 1, H-s+1, W-s+1)
    erased = images.clone()
    width = mass.shape[-1]
    for i, position in enumerate(mass.flatten(1).argmax(1).tolist()):
        top, left = divmod(position, width)
        erased[i, :, top:top + size, left:left + size] = fill[i].to(images.dtype)
    return erased


def _display_scale(dataset, raw: Tensor) -> Tensor:
    """Raw images as values in [0, 1]: the scale pixel distances are measured on."""
    if dataset.kind == "image8":
        return raw.float() / 255.0
    lo, hi = float(dataset.train_x.min()), float(dataset.train_x.max())
    return (raw.float() - lo) / (hi - lo if hi > lo else 1.0)


def section_pixel_distance(run, dataset, *, k: int, seed: int, count: int = 4) -> Section:
    section = Section("point-10", "Point 10: a shifted image against a damaged one")
    section.paragraphs.append(
        "The note: take a digit, make (a) the same digit moved a few pixels sideways and (b) the "
        "digit with a small piece cut away. The shifted one keeps its meaning, yet its pixel "
        "distance to the original is larger, so a likelihood built on pixel distance prefers the "
        "damaged digit. Below, both are made from this run's real test images and scored three "
        "ways: the mean squared pixel distance to the original, the decoder's likelihood "
        "p(x | z) at the original's code z = E<sub>q</sub>[z | original] (a Gaussian or "
        "Bernoulli around one decoded image: exactly a pixel-distance likelihood), and the "
        "model's log p(x), importance sampled.")
    shape = tuple(dataset.shape)
    if not is_image_shape(shape) or min(shape[1:]) < 4:
        section.paragraphs.append(
            f"This run's examples have shape {_esc(str(shape))}, not images of at least 4 x 4 "
            "pixels, so there is nothing to shift or cut; the demonstration needs an image "
            "dataset (for example <code>vaekit train --data mnist</code>).")
        return section
    model, pipeline = run.model, run.pipeline
    device = next(model.parameters()).device
    indices = list(range(min(count, len(dataset.test_x))))
    wanted = "2"
    if dataset.label_names and wanted in dataset.label_names and dataset.test_y is not None:
        label = dataset.label_names.index(wanted)
        matches = (dataset.test_y == label).nonzero().flatten().tolist()
        if matches:
            indices = matches[:count]
            section.paragraphs.append(f"The originals are the first test images labelled "
                                      f"&ldquo;{wanted}&rdquo;, the note's own example.")
    originals = dataset.test_x[indices]  # (n, C, H, W) raw
    side = min(shape[1:])
    pixels = max(1, round(side / 10))
    patch = max(1, round(side / 7))
    variants = {"original": originals, f"shifted right by {pixels} px":
                shift_right(originals, pixels),
                f"{patch} x {patch} patch erased": erase_patch(originals, patch)}
    shown = {name: _display_scale(dataset, raw) for name, raw in variants.items()}
    mse = {name: ((images - shown["original"]) ** 2).flatten(1).mean(1)
           for name, images in shown.items()}  # (n,) each
    log_px, at_code = {}, {}
    with torch.inference_mode():
        for name, raw in variants.items():
            scored_images, estimates, likelihoods = [], [], []
            for row, index in enumerate(indices):
                # Each version of example `index` gets that example's noise (binarisation,
                # importance samples): the three are compared on equal terms.
                x = pipeline.fixed(raw[row:row + 1].to(device), index, "test")
                original = pipeline.fixed(originals[row:row + 1].to(device), index, "test")
                weights = log_weights(model, x, index, k, seed=seed, split="test")
                estimates.append(float(log_mean_exp(weights).estimate[0]))
                code = model.point_code(original)  # (1, code_dim)
                likelihoods.append(float(model.decode(code).log_prob(x)[0]))
                scored_images.append(pipeline.display(x).cpu())
            log_px[name] = [v + pipeline.log_jacobian for v in estimates]
            at_code[name] = [v + pipeline.log_jacobian for v in likelihoods]
            if pipeline.mode == "binarize":
                shown[f"{name}, as the model scores it"] = torch.cat(scored_images)
    names = list(variants)
    rows = [titled(image_grid(images, columns=len(indices)), title, width=420)
            for title, images in shown.items()]
    section.figures.append(Figure("point10", stack_vertically(rows), (
        "Rows: the original test images, the same images shifted sideways, and with a small "
        "patch erased" + ("; then the binary images the Bernoulli likelihood scores (one fixed "
                          "binarisation per example)" if pipeline.mode == "binarize" else "")
        + ".")))
    header = ["image", "version", "pixel MSE to original", "log p(x | z of original), nats",
              f"log p(x), nats (IS, k = {k})"]
    table = [header]
    for row, index in enumerate(indices):
        for name in names:
            table.append([f"test #{index}", name, f"{float(mse[name][row]):.4f}",
                          _fmt(at_code[name][row]), _fmt(log_px[name][row])])
    section.table = table
    shifted, erased = names[1], names[2]
    n = len(indices)
    prefer_pixels = sum(float(mse[shifted][i]) > float(mse[erased][i]) for i in range(n))
    prefer_code = sum(at_code[erased][i] > at_code[shifted][i] for i in range(n))
    prefer_model = sum(log_px[erased][i] > log_px[shifted][i] for i in range(n))
    section.paragraphs.append(
        f"<strong>Pixel distance prefers the damaged image in {prefer_pixels} of {n} cases</strong>"
        f" (its MSE to the original is smaller than the shifted image's). The decoder's "
        f"likelihood at the original's code, a pixel-distance likelihood, prefers the damaged "
        f"image in {prefer_code} of {n}. The model's log p(x) prefers the damaged image in "
        f"{prefer_model} of {n}: log p(x) asks whether <em>any</em> z explains the image, not "
        "whether it is close to one particular image; still, a VAE trained on centred images "
        "has seen few shifted ones, so it need not call the shifted image likely either. This is "
        "why sampling z from the prior and judging by p(x | z) (point 9) fails: the z that "
        "could have made a given x are a tiny part of the prior, and nearby pixels are not "
        "nearby meanings.")
    return section


# --- points 9-11: naive prior sampling against importance sampling ------------------------------


@dataclass
class Sweep:
    """Estimates on the same examples as k grows, in nats per example (data units)."""

    ks: list[int]
    importance: list[tuple[float, float, float]]  # (mean, se, mean ESS) per k
    naive: list[tuple[float, float, float]]
    elbo: tuple[float, float]  # (mean, se) from all k_max samples
    per_example_log_px: Tensor  # (B,) IS at k_max
    per_example_elbo: Tensor  # (B,)
    per_example_gap_var: Tensor  # (B,)
    n: int


def estimator_sweep(run, raw: Tensor, *, k: int, seed: int) -> Sweep:
    """IS_k and naive_k on the first examples of the test split for k = 1 .. k (nested samples:
    every k uses the first k draws, the same ones `vaekit evaluate` uses for these examples)."""
    model, pipeline = run.model, run.pipeline
    device = next(model.parameters()).device
    jacobian = pipeline.log_jacobian
    with torch.inference_mode():
        x = pipeline.fixed(raw.to(device), 0, "test")
    posterior = log_weights(model, x, 0, k, seed=seed, split="test", proposal="posterior")
    prior = log_weights(model, x, 0, k, seed=seed, split="test", proposal="prior")  # (k, B)
    ks = sorted({kk for kk in K_GRID if kk <= k} | {k})
    importance, naive = [], []
    for kk in ks:
        for weights, out in ((posterior, importance), (prior, naive)):
            sums = log_mean_exp(weights[:kk])
            mean, se = _mean_and_se(sums.estimate, sums.variance)
            out.append((mean + jacobian, se, float(sums.effective_sample_size.mean())))
    full = log_mean_exp(posterior, companion=posterior)
    elbo = full.companion.mean + jacobian  # (B,)
    elbo_mean, elbo_se = _mean_and_se(elbo, full.companion.variance_of_mean)
    return Sweep(ks, importance, naive, (elbo_mean, elbo_se), full.estimate + jacobian, elbo,
                 full.gap_variance, len(raw))


def section_estimators(run, sweep: Sweep) -> Section:
    section = Section("points-9-11", "Points 9-11: naive Monte Carlo against importance "
                      "sampling")
    k = sweep.ks[-1]
    section.paragraphs.append(
        "Point 9: knowing p(z) and p(x | z), estimate p(x) = E<sub>p(z)</sub>[p(x | z)] by "
        "averaging p(x | z<sub>j</sub>) over z<sub>j</sub> drawn from the prior. Point 11: this "
        "fails, because almost no prior draw could have produced a given x. Importance sampling "
        "draws z from the encoder's q(z | x) instead and reweights, p(x) = "
        "E<sub>q</sub>[p(x, z) / q(z | x)] (the IWAE bound of Burda et al. 2016). Both are "
        f"computed below on the same {sweep.n} test examples for k = 1 to {k:,} samples per "
        "example; each k uses the first k draws. Error bars are &plusmn; one Monte Carlo "
        "standard error of the mean over examples (delta method); ESS is the effective sample "
        "size of the weights, (&Sigma; w)<sup>2</sup> / &Sigma; w<sup>2</sup>.")
    is_final, naive_final = sweep.importance[-1], sweep.naive[-1]
    gap = is_final[0] - naive_final[0]
    se = math.hypot(is_final[1], naive_final[1])
    in_se = gap / se if se > 0 else math.inf
    if in_se > 3:
        finding = (f"<strong>At k = {k:,}, the naive estimate is {_fmt(gap)} nats per example "
                   f"below the importance-sampled one</strong> ({_fmt(naive_final[0])} against "
                   f"{_fmt(is_final[0])}, {in_se:,.0f} standard errors). ")
    elif in_se >= -3:
        finding = (f"<strong>At k = {k:,}, the two estimates agree within three standard "
                   f"errors</strong> ({_fmt(naive_final[0])} naive, {_fmt(is_final[0])} "
                   "importance sampled): on this run prior draws still land often enough where "
                   "x can be produced (a small or weakly used latent space), so plain Monte "
                   "Carlo has not failed yet; on richer models it does. ")
    else:
        finding = (f"<strong>At k = {k:,}, the naive estimate is {_fmt(-gap)} nats above the "
                   f"importance-sampled one</strong> ({-in_se:,.0f} standard errors): the "
                   "encoder's q(z|x) misses part of the posterior, so its weights are heavy-tailed "
                   "and importance sampling needs more samples. ")
    if naive_final[2] < 10:
        finding += (f"The naive estimator's effective sample size is {naive_final[2]:.1f} of "
                    f"{k:,}: one prior draw carries nearly all the weight, so its error bar is "
                    "small and wrong at once. ")
    else:
        finding += f"The naive estimator's effective sample size is {naive_final[2]:,.1f}. "
    finding += (f"Importance sampling's is {is_final[2]:,.1f}; its estimate rises with k towards "
                f"log p(x), from the ELBO's level ({_pm(*sweep.elbo, digits=3)}) at k = 1.")
    section.paragraphs.append(finding)
    ks = sweep.ks
    both = Chart(title=f"log p(x) estimates on {sweep.n} test examples",
                 xlabel="k, samples per example (log scale)",
                 ylabel="log p(x), nats per example", logx=True)
    both.add(ks, [v[0] for v in sweep.importance], label="importance sampling, z ~ q(z|x)",
             error=_finite_or_zero([v[1] for v in sweep.importance]), style="line+points")
    both.add(ks, [v[0] for v in sweep.naive], label="naive, z ~ p(z)",
             error=_finite_or_zero([v[1] for v in sweep.naive]), style="line+points")
    both.add(ks, [sweep.elbo[0]] * len(ks), label="ELBO")
    zoom = Chart(title="importance sampling alone, and the ELBO",
                 xlabel="k, samples per example (log scale)",
                 ylabel="log p(x), nats per example", logx=True)
    zoom.add(ks, [v[0] for v in sweep.importance], label="importance sampling",
             error=_finite_or_zero([v[1] for v in sweep.importance]), style="line+points")
    zoom.add(ks, [sweep.elbo[0]] * len(ks), label="ELBO (k samples)", color="#2ca02c")
    section.figures.append(Figure("estimators", stack_vertically([both.render(), zoom.render()]),
                                  "Mean estimate of log p(x) against the number of samples k, "
                                  "with ± one standard error. Top: both estimators; bottom: "
                                  "importance sampling at a scale where its convergence shows."))
    table = [["k", "importance sampling, nats", "ESS", "naive, nats", "ESS",
              "importance - naive, nats"]]
    for kk, a, b in zip(ks, sweep.importance, sweep.naive):
        table.append([f"{kk:,}", _pm(a[0], a[1]), f"{a[2]:,.1f}", _pm(b[0], b[1]),
                      f"{b[2]:,.1f}", _fmt(a[0] - b[0])])
    section.table = table
    return section


# --- point 14: the ELBO gap ----------------------------------------------------------------------


def section_gap(run, sweep: Sweep) -> Section:
    section = Section("point-14", "Point 14: log p(x) = ELBO + KL(q(z|x) || p(z|x))")
    k = sweep.ks[-1]
    log_px, elbo = sweep.per_example_log_px, sweep.per_example_elbo
    gap = log_px - elbo  # (B,)
    mean_gap, se_gap = _mean_and_se(gap, sweep.per_example_gap_var)
    below = int((elbo < log_px).sum())
    section.paragraphs.append(
        "Training maximises the ELBO, E<sub>q</sub>[log p(x | z)] &minus; KL(q(z | x) || p(z)). "
        "It is below log p(x) by exactly KL(q(z | x) || p(z | x)), how far the encoder's "
        "posterior is from the true one; maximising the ELBO therefore both raises log p(x) and "
        "pulls q towards the true posterior. Here the ELBO (mean of the k log weights) and "
        f"log p(x) (importance sampled) of {sweep.n} test examples come from the same {k:,} "
        "draws per example.")
    section.paragraphs.append(
        f"<strong>Mean gap {_pm(mean_gap, se_gap, 3)} nats per example</strong> (median "
        f"{_fmt(float(gap.median()), 3)}, largest {_fmt(float(gap.max()), 3)}); the ELBO is "
        f"below the log p(x) estimate for {below} of {sweep.n} examples. The log p(x) estimate "
        "is itself a lower bound in expectation, so these gaps slightly understate the KL to "
        "the true posterior.")
    scatter = Chart(title="ELBO against log p(x), one point per test example",
                    xlabel=f"log p(x), nats (importance sampled, k = {k:,})",
                    ylabel="ELBO, nats")
    lo, hi = float(log_px.min()), float(log_px.max())
    scatter.add([lo, hi], [lo, hi], label="ELBO = log p(x)", color="#7f7f7f")
    scatter.add(log_px.tolist(), elbo.tolist(), label="test examples", style="points")
    against = Chart(title="the gap against log p(x)",
                    xlabel=f"log p(x), nats (importance sampled, k = {k:,})",
                    ylabel="log p(x) - ELBO, nats")
    against.add(log_px.tolist(), gap.tolist(), label="KL(q(z|x) || p(z|x)) estimate",
                style="points")
    section.figures.append(Figure("gap", stack_vertically([scatter.render(), against.render()]),
                                  "Top: each test example's ELBO against its log p(x); the grey "
                                  "diagonal is ELBO = log p(x). Bottom: each example's gap, "
                                  "log p(x) - ELBO, against its log p(x)."))
    return section


# --- point 15: the two terms during training -----------------------------------------------------


def section_curves(run) -> Section:
    section = Section("point-15", "Point 15: the reconstruction term and the KL term")
    section.paragraphs.append(
        "The ELBO has two views of one objective: the reconstruction term "
        "E<sub>q</sub>[log p(x | z)] (x in, x out: does the code keep what x needs?) and the KL "
        "term KL(q(z | x) || p(z)) (variational inference: how far is each posterior from the "
        "prior, how many nats does the code cost?). vaekit logs both, for the training batches "
        "and the test set, every epoch (metrics.jsonl).")
    rows = [m for m in read_metrics(run.path) if "test_elbo" in m]
    if not rows:
        section.paragraphs.append("This run has no complete epoch in metrics.jsonl yet.")
        return section
    first, last = rows[0], rows[-1]
    section.paragraphs.append(
        f"From epoch {first['epoch']} to {last['epoch']} the test reconstruction term went from "
        f"{_fmt(first['test_reconstruction'])} to {_fmt(last['test_reconstruction'])} nats and "
        f"the KL term from {_fmt(first['test_kl'])} to {_fmt(last['test_kl'])} nats: the ELBO "
        f"moved from {_fmt(first['test_elbo'])} to {_fmt(last['test_elbo'])}. The KL is the "
        "price of the information the code carries about x; the reconstruction is what that "
        "information buys.")
    section.figures.append(Figure("curves", curves_image(rows),
                                  "The ELBO, its reconstruction term and its KL term per "
                                  "example, for training batches and the test set, per epoch."))
    table = [["epoch", "train reconstruction", "train KL", "test reconstruction", "test KL",
              "test ELBO"]]
    for m in rows:
        epoch = str(m["epoch"]) + (" (restored by early stopping)" if "early_stopping" in m
                                   else "")
        table.append([epoch, _fmt(m.get("train_reconstruction")),
                      _fmt(m.get("train_kl")), _fmt(m["test_reconstruction"]),
                      _fmt(m["test_kl"]), _fmt(m["test_elbo"])])
    section.table = table
    return section


# --- point 16: the reparameterisation trick ------------------------------------------------------


def section_gradients(run, raw: Tensor, *, samples: tuple[int, ...], repeats: int,
                      seed: int) -> Section:
    from .hierarchy import single_latent_view

    section = Section("point-16", "Point 16: the reparameterisation trick")
    model, pipeline = single_latent_view(run.model), run.pipeline  # a hierarchy: its top group
    device = next(model.parameters()).device
    with torch.inference_mode():
        x = pipeline.fixed(raw.to(device), 0, "test")
    x = x.clone()  # a normal tensor, so autograd may use it
    results = gradient_variance(model, x, samples=samples, repeats=repeats, seed=seed)
    section.paragraphs.append(
        "The reconstruction term needs a sample z ~ q(z | x), and a sample is not a "
        "differentiable function of the encoder's parameters. The reparameterisation trick "
        "writes z = &mu; + &sigma; &#8857; &epsilon; with &epsilon; ~ N(0, I), so the gradient "
        "flows through &mu; and &sigma; (Kingma &amp; Welling 2014). The alternative that needs "
        "no trick is the score-function (REINFORCE) estimator, E<sub>q</sub>[log p(x | z) "
        "&nabla; log q(z | x)] (Williams 1992), used here plain, without baseline or control "
        f"variate. Both estimate the same gradient of the ELBO of {len(raw)} test examples with "
        "respect to the encoder's "
        f"{results[0].parameters:,} parameters; each is repeated {repeats} times with fresh "
        "noise at S samples of z per example, and the variance is the sum over parameters of "
        "the variance of each gradient component (the KL term is differentiated exactly in both "
        "where it has a closed form).")
    by_count: dict[int, dict[str, object]] = {}
    for result in results:
        by_count.setdefault(result.samples, {})[result.estimator] = result
    table = [["S (samples per example)", "estimator", "gradient variance (sum over parameters)",
              f"|mean of the {repeats} estimates|", "variance ratio score / reparam"]]
    ratios = []
    for count, pair in by_count.items():
        rep, score = pair["reparameterisation"], pair["score-function"]
        ratio = score.variance / rep.variance if rep.variance > 0 else math.inf
        ratios.append(ratio)
        for result in (rep, score):
            table.append([str(count), result.estimator, f"{result.variance:.4g}",
                          f"{result.mean_norm:.4g}",
                          f"{ratio:,.0f}" if result is score else ""])
    section.table = table
    counts = list(by_count)
    chart = Chart(title="variance of the ELBO gradient (encoder parameters)",
                  xlabel="S, samples of z per example (log scale)",
                  ylabel="log10 variance", logx=True)
    for estimator in ("reparameterisation", "score-function"):
        chart.add(counts, [math.log10(max(by_count[c][estimator].variance, 1e-300))
                           for c in counts], label=estimator, style="line+points")
    section.figures.append(Figure("gradients", chart.render(),
                                  f"Gradient variance against S, {repeats} repeats each; the "
                                  "same noise feeds both estimators."))
    if min(ratios) > 1:
        finding = (f"<strong>The score-function gradient's variance is {min(ratios):,.0f} to "
                   f"{max(ratios):,.0f} times the reparameterised one's</strong> at equal sample "
                   "counts. Both fall roughly as 1/S, so matching the reparameterisation trick's "
                   "precision with REINFORCE would take that many times more samples.")
    else:
        finding = (f"<strong>The ratio of the score-function to the reparameterised gradient "
                   f"variance ranges from {min(ratios):.3g} to {max(ratios):.3g}</strong> on "
                   "this run: the reparameterisation trick is not uniformly better here.")
    section.paragraphs.append(finding)
    return section


# --- the page -----------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 980px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #555; font-size: 0.92em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; image-rendering: pixelated; }
figcaption { color: #444; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child, td:nth-child(2) { text-align: left; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(title: str, meta: list[str], sections: list[Section],
                images: dict[str, bytes], figure_prefix: str | None = "explain-") -> str:
    """One page, figures embedded as data: URIs so it opens from disk with no server.
    figure_prefix: the captions name each figure's PNG file, PREFIX + NAME.png (None: no file)."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{_esc(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>{_esc(title)}</h1>"]
    out += [f'<p class="meta">{line}</p>' for line in meta]
    out.append("<nav><ol>")
    out += [f'<li><a href="#{s.anchor}">{_esc(s.title)}</a></li>' for s in sections]
    out.append("</ol></nav>")
    for section in sections:
        out.append(f'<section id="{section.anchor}">')
        out.append(f"<h2>{_esc(section.title)}</h2>")
        out += [f"<p>{paragraph}</p>" for paragraph in section.paragraphs]
        for figure in section.figures:
            data = base64.b64encode(images[figure.name]).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" '
                       f'alt="{_esc(figure.caption)}"><figcaption>{_esc(figure.caption)}'
                       + ("" if figure_prefix is None
                          else f" ({_esc(figure_prefix + figure.name)}.png)")
                       + "</figcaption></figure>")
        if section.table:
            header, *rows = section.table
            out.append("<table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{_esc(cell)}</td>" for cell in row) + "</tr>"
                    for row in rows]
            out.append("</tbody></table>")
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def explain(run, dataset, *, seed: int = 0, examples: int = 100, k: int = 5000,
            gradient_examples: int = 8, gradient_samples: tuple[int, ...] = (1, 10, 100),
            gradient_repeats: int = 100, refit_steps: int = 1000, log=print) -> Path:
    """Write RUN_DIR/explain.html and its figures RUN_DIR/explain-*.png; returns the page.

    examples: test examples for the estimator sweep and the ELBO gap; k: the largest number of
    samples per example; the gradient demonstration uses gradient_examples test examples and
    gradient_repeats independent estimates at each count in gradient_samples.
    """
    from . import __version__
    from .runs import atomic_write_text, writing

    if k < 2 or examples < 2:
        raise ValueError("explain needs k >= 2 and at least 2 examples")
    if run.config.conditional:
        from .errors import ConfigError

        raise ConfigError(f"{run.path} is conditional; vaekit explain demonstrates the note on "
                          "unconditional models (use vaekit evaluate for log p(x | y))")
    model = run.model
    was_training = model.training
    model.eval()
    raw = dataset.test_x[:examples]
    try:
        log("explain: point 10 (shifted vs damaged images)")
        sections = [section_pixel_distance(run, dataset, k=k, seed=seed)]
        log(f"explain: points 9-11 (naive vs importance sampling, {len(raw)} examples, "
            f"k up to {k})")
        sweep = estimator_sweep(run, raw, k=k, seed=seed)
        sections += [section_estimators(run, sweep), section_gap(run, sweep)]
        from .approximation_report import section_approximation

        sections.append(section_approximation(run, dataset, examples=examples,
                                              k=min(k, 1000), steps=refit_steps, seed=seed,
                                              log=log))
        log("explain: point 15 (training curves)")
        sections.append(section_curves(run))
        log(f"explain: point 16 (gradient variance, {gradient_repeats} repeats)")
        sections.append(section_gradients(run, dataset.test_x[:gradient_examples],
                                          samples=gradient_samples, repeats=gradient_repeats,
                                          seed=seed))
        from .sample_report import section_samples

        log("explain: samples and their nearest training images")
        sections.append(section_samples(run, dataset, seed=seed, log=log))
    finally:
        model.train(was_training)
    images = {}
    with writing("cannot write the report", run.path, "make the run folder writable"):
        for section in sections:
            for figure in section.figures:
                images[figure.name] = png_bytes(figure.image)
                save_png(figure.image, run.path / f"explain-{figure.name}.png")
    config = run.config
    meta = [
        f"Run <code>{_esc(str(run.path))}</code>: {_esc(run.data['name'])} "
        f"({_esc('x'.join(map(str, run.data['shape'])))}), {_esc(config.net)} VAE with a "
        f"{config.latent_dim}-dimensional {_esc(config.prior)} prior and a "
        f"{_esc(config.likelihood)} likelihood.",
        f"log p(x) here is the likelihood of: {_esc(run.pipeline.description)}. Nats per "
        "example in the data's own units.",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by vaekit {__version__} "
        f"(seed {seed}). Each section follows one point of the study note the project grew "
        "from.",
    ]
    page = render_html(f"What this VAE shows: {run.name}", meta, sections, images)
    target = run.path / "explain.html"
    with writing("cannot write the report", target, "make the run folder writable"):
        atomic_write_text(target, page)
    return target
