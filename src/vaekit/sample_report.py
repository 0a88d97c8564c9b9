"""Sample quality in the reports: its section of the `vaekit evaluate` table, and the `vaekit
explain` section that shows samples beside their nearest real training examples.

The scores come from sample_quality.py; this module only arranges them and the pictures.
"""

from __future__ import annotations

import torch

from . import jsonio
from .errors import RunError
from .features import data_units, features_for, is_image
from .sample_metrics import pairwise_distances
from .sample_quality import draw_samples, reference_indices
from .viz import image_grid, titled

NEIGHBOURS = 4  # real neighbours shown per sample
SHOWN = 8  # samples shown


SCORE_COLUMNS = (("frechet_distance", "Frechet dist.", 1.0), ("kid", "KID x 1e3", 1e3),
                 ("precision", "precision", 1.0), ("recall", "recall", 1.0),
                 ("density", "density", 1.0), ("coverage", "coverage", 1.0))


def _significant(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _score_cell(score: dict, scale: float) -> str:
    """value [low,high] to three significant figures."""
    value, low, high = (_significant(scale * score[key]) for key in ("value", "low", "high"))
    return f"{value} [{low},{high}]"


def sample_quality_table(quality: dict) -> str:
    """The `sample_quality` object (sample_quality.evaluate_sample_quality) as text."""
    features = quality["features"]
    reference = quality["reference"]
    test = features.get("test_accuracy")
    judged = f"test accuracy {100 * test:.1f} %" if test is not None else \
        f"test reconstruction R^2 {features.get('test_reconstruction_r2', float('nan')):.3f}"
    if "model_digest" in features:  # pretrained (pretrained_features.py)
        described = (f"features: {features['kind']} class token ({features['dimensions']} "
                     f"features, images resized to {features['image_size']}), "
                     f"{features['source']}")
    else:
        described = (f"features: {features['kind']} trained by vaekit on "
                     f"{features['trained_on']} ({features['dimensions']} features, {judged}), "
                     f"{features.get('file', '')}")
    lines = [
        f"sample quality: {quality['samples']:,} samples per row against {reference['n']:,} "
        f"training examples{' (a seeded subset)' if reference['seeded_subset'] else ''}; "
        f"[95 % bootstrap interval, {quality['bootstrap']} resamples]",
        described,
        "",
    ]
    width = 22
    header = f"{'':34}" + "".join(f"{name:>{width}}" for _, name, _ in SCORE_COLUMNS)
    conditional = quality.get("conditional")
    lines.append(header + (f"{'right class':>14}" if conditional else ""))

    def row(label: str, scores: dict) -> None:
        text = f"{label:34}" + "".join(f" {_score_cell(scores[key], scale):>{width - 1}}"
                                        for key, _, scale in SCORE_COLUMNS)
        if conditional and "class_agreement" in scores:
            text += f"{100 * scores['class_agreement']['share']:>12.1f} %"
        lines.append(text)

    floor = quality["floor"]
    row(f"floor: real test, n = {floor['mean']['n']:,}", floor["mean"])
    if floor["sampled"] != floor["mean"]:
        row("floor: real test as the model sees", floor["sampled"])
    for scores in quality["scores"]:
        pixels = "E[x|z]" if scores["pixels"] == "mean" else "x ~ p(x|z)"
        row(f"T = {scores['temperature']:g}  {pixels}", scores)
    lines += [
        "",
        "Lower is better for the Frechet distance and KID; higher for precision, recall and "
        "coverage; density near 1 (it exceeds 1 where samples crowd dense regions). The floor is "
        "what real test examples score: no model is expected to beat it. E[x|z] rows score the "
        "decoder's mean against the real examples; x ~ p(x|z) rows a draw against the real "
        "examples as the likelihood sees them. T: the prior's noise scaled by T.",
    ]
    return "\n".join(lines)





def section_samples(run, dataset, *, seed: int = 0, log=print):
    """Samples E[x|z] (T = 1) and their nearest training examples in the feature space."""
    from .report import Figure, Section, _esc

    section = Section("samples", "Point 1: new samples, and the real images nearest to them")
    section.paragraphs.append(
        "A VAE exists to generate. Each row below is one sample, E[x|z] with z drawn from the "
        f"prior, followed by the {NEIGHBOURS} training images nearest to it in the features of "
        "a network vaekit trained on this run's data (the features the sample-quality scores "
        "use). Neighbours that are near copies of the sample would mean the model memorised "
        "training images; neighbours that merely resemble it mean it generalises. The distance "
        "ratio compares each sample's nearest-neighbour distance with the median of the same "
        "distance for real test images: below 1, a sample sits closer to the training set than "
        "new real data do.")
    features = features_for(dataset, log=log)
    index = reference_indices(dataset)
    train = data_units(dataset, dataset.train_x[index])  # (R, *shape)
    reference = features(train)  # (R, F)
    samples, _ = draw_samples(run, SHOWN, 1.0, seed, None)  # (SHOWN, *shape)
    distance = pairwise_distances(features(samples), reference)  # (SHOWN, R)
    nearest = distance.topk(NEIGHBOURS, dim=1, largest=False)
    test = data_units(dataset, dataset.test_x[:1000])
    test_nearest = pairwise_distances(features(test), reference).min(1).values  # (T,)
    typical = float(test_nearest.median())
    if is_image(tuple(dataset.shape)):
        rows = torch.cat([torch.cat([samples[i:i + 1], train[nearest.indices[i]]])
                          for i in range(SHOWN)])  # (SHOWN * (1 + NEIGHBOURS), C, H, W)
        grid = image_grid(rows.clamp(0, 1), columns=1 + NEIGHBOURS)
        section.figures.append(Figure("samples", titled(
            grid, "sample | its nearest training images", width=320),
            f"Left: {SHOWN} samples E[x|z], z ~ p(z); right: their {NEIGHBOURS} nearest "
            "training images in feature space, nearest first."))
    else:
        section.paragraphs.append(f"The examples have shape {_esc(str(tuple(dataset.shape)))}, "
                                  "not images: only the distances are shown.")
    table = [["sample", "nearest distance", "ratio to real test images' median",
              "training images (index)"]]
    for i in range(SHOWN):
        table.append([f"#{i}", f"{float(nearest.values[i, 0]):.3f}",
                      f"{float(nearest.values[i, 0]) / typical:.2f}",
                      ", ".join(str(int(index[j])) for j in nearest.indices[i])])
    section.table = table
    evaluation = run.path / "evaluation.json"
    quality = None
    if evaluation.is_file():
        try:
            quality = jsonio.read_json(evaluation, "evaluation.json").get("sample_quality")
        except (RunError, AttributeError):  # unreadable or not an object: no scores to show
            quality = None
    if quality:
        section.paragraphs.append("The scores of this run's samples (from evaluation.json):")
        section.paragraphs.append("<pre>" + _esc(sample_quality_table(quality)) + "</pre>")
    else:
        section.paragraphs.append(
            "For the scores (Frechet distance, KID, precision, recall, density and coverage, "
            "beside the floor of real test images) run <code>vaekit evaluate RUN_DIR "
            "--sample-quality</code>; this page shows them once evaluation.json holds them.")
    return section
