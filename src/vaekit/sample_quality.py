"""Sample quality of a trained run: its samples scored against real training examples.

    vaekit evaluate RUN_DIR --sample-quality [--samples N] [--temperatures 1.0,0.8]

For each temperature T (distributions.draw_at_temperature) the same N codes z ~ p_T(z) are
decoded twice and both are scored: the decoder's mean E[x|z] (what `vaekit sample` shows) and a
draw x ~ p(x|z) (what the model's likelihood describes; for a Bernoulli model, binary images).
The scores (sample_metrics) are measured in the dataset's own feature network (features.py)
against a fixed reference: a seeded subset of at most 10,000 training examples, the same for
every run on the data. Beside them, the floor: the real test examples scored the same way, at
the same count where the test set allows. Means are compared with the real examples as they are;
draws with the real examples as the model sees them (the run's pipeline: binarised with its fixed
seeded noise for a Bernoulli model), so each is judged against what it is a picture of.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from . import jsonio
from .data import Dataset
from .errors import ConfigError, RunError
from .features import Features, data_units, describe, features_for
from .randomness import derive_seed, seeded_generator
from .sample_metrics import BOOTSTRAP, K_NEAREST, SCORES, Reference, score_samples

REFERENCE_SIZE = 10_000  # real examples in the reference (k-NN radii cost R^2 distances)
DEFAULT_SAMPLES = 10_000
MAX_SAMPLES = 200_000  # distances are chunked, but N x N of them are computed
CHUNK = 1000  # codes decoded at a time

FLOOR_WHAT = {"mean": "real test examples as they are, against the reference",
              "sampled": "real test examples as the likelihood sees them (the run's pipeline), "
                         "against the reference seen the same way"}
PIXELS = {"mean": "E[x|z], the decoder's mean", "sampled": "x ~ p(x|z), a draw"}


def reference_indices(dataset: Dataset, size: int = REFERENCE_SIZE) -> Tensor:
    """The training examples every run on this dataset is compared with (seeded, sorted)."""
    n = len(dataset.train_x)
    if n <= size:
        return torch.arange(n)
    order = torch.randperm(n, generator=seeded_generator(derive_seed(0, "sample-quality-ref")))
    return order[:size].sort().values


def as_modelled(run, raw: Tensor, indices: Tensor, split: str) -> Tensor:
    """Examples `indices` of a split as the run's likelihood sees them, in data units.

    The pipeline's noise (binarisation, dequantisation) is fixed per example index, so the
    examples are processed in contiguous chunks of the split and the wanted rows kept."""
    pipeline = run.pipeline
    device = next(run.model.parameters()).device
    if not pipeline.noisy:
        return pipeline.display(pipeline.apply(raw[indices].to(device), None)).cpu()
    kept = []
    wanted = torch.zeros(len(raw), dtype=torch.bool)
    wanted[indices] = True
    for start in range(0, len(raw), 4096):
        stop = min(start + 4096, len(raw))
        rows = wanted[start:stop]
        if rows.any():
            x = pipeline.fixed(raw[start:stop].to(device), start, split)  # (c, *shape)
            kept.append(pipeline.display(x)[rows.to(device)].cpu())
    return torch.cat(kept)


def draw_samples(run, n: int, temperature: float, seed: int,
                 labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """(E[x|z], x ~ p(x|z)) for the same n codes z at this temperature, in data units."""
    model, pipeline = run.model, run.pipeline
    device = next(model.parameters()).device
    codes = seeded_generator(derive_seed(seed, "sample-quality-codes", float(temperature)))
    pixels = seeded_generator(derive_seed(seed, "sample-quality-pixels", float(temperature)))
    means, draws = [], []
    with torch.inference_mode():
        # every code in one draw: the result depends on (seed, n, T) alone, not on CHUNK
        z = model.sample_codes(n, temperature, codes,
                               None if labels is None else labels.to(device))  # (n, code_dim)
        for start in range(0, n, CHUNK):
            y = None if labels is None else labels[start:start + CHUNK].to(device)
            px = model.decode(z[start:start + CHUNK], y)
            means.append(pipeline.display(px.mean).cpu())
            with torch.random.fork_rng(devices=[]):  # p(x|z) draws through the global RNG
                torch.manual_seed(int(torch.randint(2**62, (), generator=pixels)))
                draws.append(pipeline.display(px.sample()).cpu())
    return torch.cat(means), torch.cat(draws)


def _class_agreement(features: Features, images: Tensor, labels: Tensor) -> dict:
    """Share of samples the feature classifier assigns to the class they were drawn for."""
    agree = (features.predict(images) == labels).double()
    n = len(agree)
    share = float(agree.mean())
    return {"share": share, "se": (share * (1 - share) / n) ** 0.5, "n": n}


CACHE_FORMAT = 1


def _reference_key(run, features: Features, size: int, floor_n: int, bootstrap: int,
                   seed: int) -> str:
    """What the reference and the floor depend on: the data, the feature network, the run's
    pipeline (how draws see the real images), the counts and the seeds; not the model."""
    pipeline = run.pipeline
    facts = {"format": CACHE_FORMAT, "fingerprint": features.info["fingerprint"],
             "features": features.info.get("format"), "steps": features.info.get("steps"),
             "pretrained": features.info.get("model_digest"),
             "pipeline": [pipeline.mode, pipeline.kind, pipeline.split_seed], "size": size,
             "floor": floor_n, "bootstrap": bootstrap, "seed": seed, "k": K_NEAREST}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def _compute_reference_and_floor(run, dataset: Dataset, features: Features, index: Tensor,
                                 floor_n: int, bootstrap: int, seed: int):
    test_rows = torch.arange(floor_n)
    references = {"mean": Reference.of(features(data_units(dataset, dataset.train_x[index])))}
    real_test = {"mean": features(data_units(dataset, dataset.test_x[:floor_n]))}
    if run.pipeline.noisy:
        references["sampled"] = Reference.of(features(as_modelled(run, dataset.train_x, index,
                                                                  "train")))
        real_test["sampled"] = features(as_modelled(run, dataset.test_x, test_rows, "test"))
    floor = {"mean": score_samples(real_test["mean"], references["mean"], bootstrap=bootstrap,
                                   seed=derive_seed(seed, "floor"))}
    if run.pipeline.noisy:
        floor["sampled"] = score_samples(real_test["sampled"], references["sampled"],
                                         bootstrap=bootstrap,
                                         seed=derive_seed(seed, "floor", "sampled"))
    return references, floor


def reference_and_floor(run, dataset: Dataset, features: Features, index: Tensor, floor_n: int,
                        *, bootstrap: int, seed: int):
    """The references ({"mean", "sampled"}: Reference) and the floor's scores, from the cache
    (cache_dir()/features/FINGERPRINT-reference-KEY.safetensors) or computed and cached: they
    are the same for every run on the data with the same pipeline, so only the first run's
    evaluation pays for them. An unreadable cache file is recomputed and replaced."""
    from .runs import atomic_write_bytes, tensors_to_bytes

    key = _reference_key(run, features, len(index), floor_n, bootstrap, seed)
    folder = features.info.get("reference_dir") or (
        Path(features.info["file"]).parent if "file" in features.info else None)
    path = Path(folder) / f"{features.info['fingerprint']}-reference-{key}.safetensors" \
        if folder is not None else None
    if path is not None and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                floor = jsonio.loads(handle.metadata()["floor"], str(path), error=ValueError)
                kernel_means = jsonio.loads(handle.metadata()["kernel_means"], str(path),
                                            error=ValueError)
                references = {pixels: Reference.from_parts(
                    handle.get_tensor(f"{pixels}.features"), handle.get_tensor(f"{pixels}.radii"),
                    kernel_means[pixels]) for pixels in kernel_means}
            if set(references) == set(floor) and set(floor) <= set(PIXELS):
                return _both_kinds(references, floor)
        except Exception:  # a damaged derived file: recompute it
            pass
    references, floor = _compute_reference_and_floor(run, dataset, features, index, floor_n,
                                                     bootstrap, seed)
    if path is not None:
        tensors = {f"{pixels}.{name}": value for pixels, reference in references.items()
                   for name, value in (("features", reference.features),
                                       ("radii", reference.radii))}
        metadata = {"floor": json.dumps(floor), "kernel_means": json.dumps(
            {pixels: reference.kernel_mean for pixels, reference in references.items()})}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))
        except OSError:
            pass  # a cache that cannot be written costs time, not correctness
    return _both_kinds(references, floor)


def _both_kinds(references: dict, floor: dict):
    """Without pipeline noise, draws see the real images as they are: one reference serves."""
    references.setdefault("sampled", references["mean"])
    floor.setdefault("sampled", floor["mean"])
    return references, floor


def evaluate_sample_quality(run, dataset: Dataset, *, samples: int | None = None,
                            temperatures: tuple[float, ...] = (1.0,), seed: int = 0,
                            bootstrap: int = BOOTSTRAP, features_spec: str | None = None,
                            log=None) -> dict:
    """The `sample_quality` object of evaluation.json (see the module docstring).
    features_spec: `dinov2:PATH` for pretrained features (pretrained_features.py), else None
    for vaekit's own feature network of the dataset."""
    started = time.monotonic()
    n_test = len(dataset.test_x)
    n = samples if samples is not None else min(DEFAULT_SAMPLES, n_test)
    if not 10 <= n <= MAX_SAMPLES:
        raise ConfigError(f"--samples must be between 10 and {MAX_SAMPLES:,}, got {n:,}")
    if not temperatures or any(not (0 <= t <= 10) for t in temperatures):
        raise ConfigError("temperatures must be numbers between 0 and 10, such as 1.0,0.8")
    if features_spec is not None:
        from .pretrained_features import load_pretrained_features

        features = load_pretrained_features(features_spec, dataset)
    else:
        features = features_for(dataset, log=log)
    conditional = run.config.conditional
    if conditional and dataset.train_y is None:
        raise ConfigError("a conditional run needs class labels in its data")
    # the share of samples of the requested class needs a classifier: vaekit's own features
    judge = conditional and features.net.num_classes is not None
    index = reference_indices(dataset)
    floor_n = min(n, n_test)
    if log:
        log(f"sample quality: reference of {len(index):,} training examples, floor of "
            f"{floor_n:,} test examples")
    test_rows = torch.arange(floor_n)
    references, floor = reference_and_floor(run, dataset, features, index, floor_n,
                                            bootstrap=bootstrap, seed=seed)
    labels = None
    if conditional:
        classes = run.model.num_classes
        labels = torch.arange(n) % classes  # classes in equal shares
    if judge:
        floor_labels = dataset.test_y[:floor_n]
        for pixels in PIXELS:
            floor[pixels]["class_agreement"] = _class_agreement(
                features, data_units(dataset, dataset.test_x[:floor_n]) if pixels == "mean"
                else as_modelled(run, dataset.test_x, test_rows, "test"), floor_labels)
    rows = []
    for temperature in temperatures:
        if log:
            log(f"sample quality: {n:,} samples at temperature {temperature:g}")
        decoded = draw_samples(run, n, temperature, seed, labels)
        for pixels, images in zip(PIXELS, decoded):
            if not bool(torch.isfinite(images).all()):
                raise RunError(f"{run.path}: the model's samples at temperature {temperature:g} "
                               "hold NaN or Inf; the weights are damaged or training diverged "
                               "(retrain, or resume from an earlier checkpoint)")
            row = {"temperature": temperature, "pixels": pixels, "scored": PIXELS[pixels],
                   **score_samples(features(images), references[pixels], bootstrap=bootstrap,
                                   seed=derive_seed(seed, "scores", temperature, pixels))}
            if judge:
                row["class_agreement"] = _class_agreement(features, images, labels)
            rows.append(row)
    return {
        "features": {**describe(features), "trained_on": dataset.name},
        "reference": {"split": "train", "n": len(index), "seeded_subset": len(index) <
                      len(dataset.train_x)},
        "floor": {pixels: {"what": FLOOR_WHAT[pixels], **scores}
                  for pixels, scores in floor.items()},
        "samples": n, "temperatures": list(temperatures), "seed": seed, "bootstrap": bootstrap,
        "conditional": conditional, "scores": rows, "score_names": list(SCORES),
        "seconds": time.monotonic() - started,
    }
