"""`vaekit score RUN_DIR --data IN --against OUT`: an out-of-distribution report.

Both sets are scored by the run's model (and by a background run's, for the likelihood ratio);
every score of `ood.SCORES` that the run supports is computed per example, and its detection
quality (AUROC, AUPR, FPR at 95 % TPR, bootstrap intervals) goes into a JSON object and a
self-contained HTML page with the histograms of both sets' scores and the ROC curves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
from torch import Tensor

from .data import batches
from .estimate import skip_bounds_per_example
from .errors import ConfigError, DataError
from .ood import SCORES, compressed_nats, detection, roc_curve, typicality
from .plot import PALETTE, Chart
from .scoring import ExampleScores, data_key, score_examples

OOD_FORMAT = "vaekit-ood/1"
SKIP_BOUND_SAMPLES = 64  # one-draw bounds averaged per example for the skip ratios (at most k)


def check_background(run, background) -> None:
    """A background run must score the same inputs as the run: same data shape and kind, same
    pipeline (binarisation, dequantisation or standardisation)."""
    same = (background.data["shape"] == run.data["shape"]
            and background.data["kind"] == run.data["kind"]
            and background.pipeline.mode == run.pipeline.mode
            and background.config.likelihood == run.config.likelihood)
    if not same:
        raise ConfigError(f"--background {background.path}: it models {background.data['name']} "
                          f"({'x'.join(map(str, background.data['shape']))}, "
                          f"{background.config.likelihood}) but {run.path} models "
                          f"{run.data['name']} ({'x'.join(map(str, run.data['shape']))}, "
                          f"{run.config.likelihood}); train the background on the same data "
                          "with the same likelihood and --perturb")
    if background.config.conditional:
        raise ConfigError(f"--background {background.path} is conditional; train an "
                          "unconditional background model")


@dataclass
class ScoredSet:
    name: str  # what was read
    scores: ExampleScores  # under the run's model
    background: ExampleScores | None  # under the background model
    complexity: np.ndarray | None  # L(x) in nats per example
    ood_scores: dict[str, np.ndarray]  # ood.SCORES name -> per example (typicality: per batch)


def score_set(run, raw: Tensor, name: str, *, k: int, seed: int, reference_mean: float,
              background=None, typicality_batch: int = 1, batch_size: int | None = None,
              progress=None) -> ScoredSet:
    """Every score of one set of examples (raw data of the run's shape)."""
    split = data_key(raw)
    scores = score_examples(run.model, raw, run.pipeline, k=k, seed=seed, split=split,
                            batch_size=batch_size, progress=progress)
    bg = None if background is None else score_examples(
        background.model, raw, run.pipeline, k=k, seed=seed, split=split,
        batch_size=batch_size, progress=progress)
    complexity = None
    if run.data["kind"] == "image8" and len(run.data["shape"]) == 3:
        complexity = np.concatenate([compressed_nats(_coded_input(run, raw, start, stop, split))
                                     for start, stop in batches(len(raw), 4096)])
    ood = {"likelihood": -scores.log_px,
           "typicality": typicality(scores.log_px, reference_mean)}
    if typicality_batch > 1:
        ood[f"typicality_batch{typicality_batch}"] = typicality(
            scores.log_px, reference_mean, typicality_batch, seed)
    if complexity is not None:
        ood["complexity"] = -scores.log_px - complexity
    if bg is not None:
        ood["likelihood_ratio"] = -(scores.log_px - bg.log_px)
    ood.update(skip_ratios(run, raw, split, samples=min(k, SKIP_BOUND_SAMPLES), seed=seed))
    return ScoredSet(name, scores, bg, complexity, ood)


def skip_ratios(run, raw: Tensor, split: str, *, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Havtorn et al. 2021's likelihood ratios of a run of L >= 2 latent groups, for k = 1 ..
    L-1: LLR^{>k}(x) = ELBO(x) - L^{>k}(x), L^{>k} the bound whose lowest k groups are drawn
    from their priors (estimate.skip_bounds_per_example). Larger means the upper groups'
    codes explain less of x than they do of the data the model was trained on. {} for a run of
    one latent group."""
    if len(run.model.latent_groups) < 2:
        return {}
    bounds = skip_bounds_per_example(run.model, raw, run.pipeline, samples, split=split,
                                     seed=seed).cpu().numpy()  # (N, L) ELBO, L^{>1}, ...
    return {f"skip_ratio_{skipped}": bounds[:, 0] - bounds[:, skipped]
            for skipped in range(1, bounds.shape[1])}


def _coded_input(run, raw: Tensor, start: int, stop: int, split: str) -> Tensor:
    """What the likelihood scores, as the lossless coder sees it: the binary images of a
    Bernoulli run (its fixed binarisation), else the 8-bit levels."""
    if run.pipeline.mode == "binarize":
        with torch.inference_mode():
            return run.pipeline.fixed(raw[start:stop], start, split)  # (b, C, H, W) 0/1
    return raw[start:stop]  # (b, C, H, W) uint8


def score_description(name: str) -> str:
    if name.startswith("skip_ratio_"):
        skipped = int(name[len("skip_ratio_"):])
        groups = "group" if skipped == 1 else f"{skipped} groups"
        return f"ELBO - L^{{>{skipped}}}, the bound with the lowest {groups} drawn from the " \
            "prior (Havtorn et al. 2021)"
    if name.startswith("typicality_batch"):
        size = int(name[len("typicality_batch"):])
        return f"typicality of batches of {size}: |mean log p(x) over the batch - mean test " \
            "log p(x)|"
    return SCORES[name]


def ood_report(run, inliers: ScoredSet, outliers: ScoredSet, *, reference: ExampleScores,
               bootstrap: int, seed: int, background=None) -> dict:
    """The report object: every score's detection quality and both sets' summaries."""
    from . import __version__

    try:
        detections = [detection(name, inliers.ood_scores[name], outliers.ood_scores[name],
                                bootstrap=bootstrap, seed=seed).to_dict()
                      for name in inliers.ood_scores]
    except ValueError as exc:  # too few examples, or a likelihood that is not finite
        raise DataError(f"cannot compare {inliers.name} with {outliers.name}: {exc}") from None
    for item in detections:
        item["description"] = score_description(item["score"])

    def summary(scored: ScoredSet) -> dict:
        s = scored.scores
        out = {"name": scored.name, "n": len(s), "log_px_mean": float(s.log_px.mean()),
               "log_px_sd": float(s.log_px.std()),
               "log_px_se_median": float(np.median(s.log_px_se)),
               "elbo_mean": float(s.elbo.mean()),
               "reconstruction_error_mean": float(s.reconstruction_error.mean())}
        if s.bits_per_dim is not None:
            out["bits_per_dim_mean"] = float(s.bits_per_dim.mean())
        if scored.complexity is not None:
            out["complexity_nats_mean"] = float(scored.complexity.mean())
        if scored.background is not None:
            out["background_log_px_mean"] = float(scored.background.log_px.mean())
        return out

    result = {
        "format": OOD_FORMAT, "run": str(run.path), "data": run.data["name"],
        "likelihood_of": run.pipeline.description, "k": reference.k, "seed": seed,
        "units": "nats per example; log-densities in the data's own units",
        "positive_class": "out-of-distribution (every score: larger = more unusual)",
        "in": summary(inliers), "out": summary(outliers),
        "reference": {"what": "the run's test set", "n": len(reference),
                      "log_px_mean": float(reference.log_px.mean())},
        "background": None if background is None else {
            "run": str(background.path), "perturb": background.config.perturb},
        "detections": detections,
        "not_computed": {
            **({} if len(run.model.latent_groups) > 1 else {
                "skip_ratio": "Havtorn et al. 2021 compare bounds that skip the lowest latent "
                "groups of a hierarchical VAE; this run has one latent group (train one with "
                "--latent-groups)"}),
            **({} if background is not None else {
                "likelihood_ratio": "needs --background RUN_DIR, a run trained on the same "
                "data with vaekit train --perturb 0.2"}),
            **({} if inliers.complexity is not None else {
                "complexity": "needs images (a lossless image coder gives L(x))"}),
        },
        "vaekit_version": __version__,
    }
    return result


# ------------------------------------------------------------------------------------------------
# The page


def histogram_chart(title: str, xlabel: str, inliers: np.ndarray, outliers: np.ndarray,
                    in_name: str, out_name: str, bins: int = 40) -> Chart:
    """Both sets' densities of one score as step lines over common bins."""
    both = np.concatenate([inliers, outliers])
    lo, hi = np.percentile(both, [0.5, 99.5])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    chart = Chart(title=title, xlabel=xlabel, ylabel="share of examples per unit")
    for index, (values, name) in enumerate(((inliers, in_name), (outliers, out_name))):
        counts, _ = np.histogram(np.clip(values, lo, hi), edges)
        density = counts / (len(values) * np.diff(edges))
        xs = np.repeat(edges, 2)[1:-1].tolist()
        ys = np.repeat(density, 2).tolist()
        chart.add(xs, ys, label=f"{name} ({len(values):,})", color=PALETTE[index])
    return chart


def roc_chart(inliers: ScoredSet, outliers: ScoredSet, detections: list[dict]) -> Chart:
    chart = Chart(title="ROC curves (out-of-distribution = positive)",
                  xlabel="false-positive rate (in-distribution flagged)",
                  ylabel="true-positive rate (out-of-distribution flagged)", width=760,
                  height=560)
    chart.add([0.0, 1.0], [0.0, 1.0], label="chance", color="#bbbbbb")
    for index, item in enumerate(detections):
        name = item["score"]
        fpr, tpr = roc_curve(inliers.ood_scores[name], outliers.ood_scores[name])
        chart.add(fpr.tolist(), tpr.tolist(), label=f"{name} (AUROC {item['auroc']:.3f})",
                  color=PALETTE[(index + 1) % len(PALETTE)])
    return chart


def report_page(run, result: dict, inliers: ScoredSet, outliers: ScoredSet) -> str:
    """The report as one HTML page, pictures embedded."""
    from .report import Figure, Section, _esc, render_html
    from .viz import png_bytes

    detections = result["detections"]
    in_name, out_name = result["in"]["name"], result["out"]["name"]
    table = [["score", "what it is", "AUROC", "AUPR", "FPR at 95% TPR"]]
    for item in detections:
        table.append([item["score"], item["description"],
                      *(f"{item[m]:.3f} [{item[m + '_interval'][0]:.3f}, "
                        f"{item[m + '_interval'][1]:.3f}]" for m in ("auroc", "aupr", "fpr95"))])
    first = detections[0]
    sections = [Section(
        "detection", "Detection quality",
        [f"In-distribution: <code>{_esc(in_name)}</code> ({result['in']['n']:,} examples); "
         f"out-of-distribution: <code>{_esc(out_name)}</code> ({result['out']['n']:,}). "
         f"Intervals: 95 % percentile bootstrap, {first['bootstrap']} resamples of each set. "
         "AUROC 0.5 is chance; below 0.5 the score ranks the out-of-distribution set as more "
         "typical than the in-distribution one.",
         f"log p(x) here is the likelihood of: {_esc(result['likelihood_of'])}; importance "
         f"sampled with k = {result['k']} draws per example. Mean log p(x): in "
         f"{result['in']['log_px_mean']:.2f}, out {result['out']['log_px_mean']:.2f}, the run's "
         f"test set {result['reference']['log_px_mean']:.2f} nats."],
        [Figure("roc", roc_chart(inliers, outliers, detections).render(), "ROC curves")],
        table)]
    figures = []
    for item in detections:
        name = item["score"]
        chart = histogram_chart(name, "score (larger = more "
                                "unusual), nats", inliers.ood_scores[name],
                                outliers.ood_scores[name], in_name, out_name)
        figures.append(Figure(f"hist-{name}", chart.render(),
                              f"{name}, {item['description']}: both sets' scores"))
    sections.append(Section("histograms", "Score distributions",
                            ["Each score's distribution on both sets (the same bins)."],
                            figures))
    notes = [f"{_esc(key)}: {_esc(value)}" for key, value in result["not_computed"].items()]
    sections.append(Section("not-computed", "Scores not computed", notes))
    images = {figure.name: png_bytes(figure.image) for section in sections
              for figure in section.figures}
    meta = [f"Run <code>{_esc(str(run.path))}</code>, {_esc(run.data['name'])}; reference for "
            f"typicality and percentiles: its test set ({result['reference']['n']:,} examples, "
            f"mean log p(x) {result['reference']['log_px_mean']:.2f} nats).",
            f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by vaekit "
            f"{_esc(result['vaekit_version'])}."]
    return render_html(f"Out-of-distribution report: {in_name} vs {out_name}", meta, sections,
                       images, figure_prefix=None)


def detections_table(result: dict) -> str:
    """The detections as a plain-text table for the terminal."""
    lines = [f"{'score':<22} {'AUROC':>22} {'AUPR':>22} {'FPR at 95% TPR':>22}"]
    for item in result["detections"]:
        cells = [f"{item[m]:.3f} [{item[m + '_interval'][0]:.3f}, "
                 f"{item[m + '_interval'][1]:.3f}]" for m in ("auroc", "aupr", "fpr95")]
        lines.append(f"{item['score']:<22} " + " ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
