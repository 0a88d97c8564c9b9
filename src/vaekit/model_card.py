"""The model card: README.md of a run folder or a saved model, as the Hugging Face Hub shows it.

A card is YAML metadata (library, tags, pipeline) and Markdown: what the model is (nets, latent
structure, prior, posterior, likelihood), what it was trained on and what its log-likelihoods
are of, the last epoch's figures from metrics.jsonl, log p(x) from evaluation.json once
`vaekit evaluate` has written it, the sample grid and how to load it. Text only: the files it
describes are written by runs.py (the run folder) and hub.py (a saved model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CARD_NAME = "README.md"
SAMPLES_NAME = "samples.png"


def _number(value, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _with_se(result: dict, key: str, digits: int = 2) -> str:
    se = result.get(f"{key}_se")
    shown = _number(result.get(key), digits)
    if shown != "n/a" and isinstance(se, (int, float)) and math.isfinite(se):
        shown += f" ± {se:.2g}"
    return shown


def describe_model(model: dict, label_names: list[str] | None) -> str:
    """One sentence of what a ModelConfig (as a dict) builds."""
    groups = model.get("latent_groups")
    if groups:
        latent = (f"a hierarchical VAE with {len(groups)} latent groups of "
                  f"{', '.join(map(str, groups))} dimensions (top down; a standard normal top "
                  "group, learned Gaussian priors below it)")
    else:
        latent = (f"a VAE with a {model['latent_dim']}-dimensional latent space, prior "
                  f"{model['prior']}, posterior {model['posterior']}")
    hidden = ",".join(map(str, model.get("hidden") or [])) or "none (linear)"
    text = (f"{latent}; {model['net']} networks (hidden {hidden}, {model['activation']}), "
            f"likelihood {model['likelihood']}, on examples of shape "
            f"{'x'.join(map(str, model['data_shape']))}")
    if model.get("num_classes"):
        names = f" ({', '.join(label_names)})" if label_names else ""
        text += (f"; conditional on {model['num_classes']} class labels{names}: its ELBO bounds "
                 "log p(x | y)")
    return text + "."


def _front_matter(data_name: str | None, image: bool) -> str:
    tags = ["vaekit", "variational-autoencoder", "pytorch", "generative-model"]
    if data_name:
        tags.append(data_name)
    lines = ["---", "library_name: vaekit", "tags:"] + [f"- {json.dumps(t)}" for t in tags]
    if image:
        lines.append("pipeline_tag: unconditional-image-generation")
    return "\n".join(lines + ["---", ""])


def _usage(where: str) -> str:
    return (
        "## Use\n\n"
        "```python\n"
        "from vaekit.model import LatentModel   # pip install vaekit  (a Hub id: 'vaekit[hub]')\n\n"
        f"model = LatentModel.from_pretrained({where!r})\n"
        "x = model.sample(16, mean=True)        # z ~ p(z), then E[x | z]\n"
        "q = model.encode(x)                    # q(z | x), a torch Distribution\n"
        "```\n\n"
        "The weights are safetensors and the configuration JSON: loading runs no pickle.\n")


def _training_section(config: dict, metrics: list[dict]) -> str:
    text = (f"## Training\n\n`vaekit train`: {config.get('epochs')} epochs of batch "
            f"{config.get('batch_size')}, Adam at lr {config.get('lr')} (decay "
            f"{config.get('lr_decay')} per epoch), objective {config.get('objective')}, beta "
            f"{config.get('beta')} ({config.get('kl_schedule')}), seed {config.get('seed')}. "
            "Every option is in `config.json`.\n")
    complete = [m for m in metrics if m.get("complete", True) and "test_elbo" in m]
    if not complete:
        return text + "\nNo complete epoch yet.\n"
    last = complete[-1]
    rows = [("test ELBO", "test_elbo"), ("  reconstruction E_q[log p(x|z)]", "test_reconstruction"),
            ("  KL(q(z|x) ‖ p(z))", "test_kl"), ("test IWAE bound", "test_iwae"),
            ("train ELBO", "train_elbo"), ("test bits per dimension", "test_bits_per_dim")]
    table = [f"| {name} | {_number(last[key], 4 if 'bits' in key else 2)} |"
             for name, key in rows if key in last]
    return (text + f"\nAfter epoch {last.get('epoch')} (step {last.get('step')}; nats per "
            "example, from `metrics.jsonl`):\n\n| figure | value |\n|---|---|\n"
            + "\n".join(table) + "\n")


def _evaluation_section(result: dict | None) -> str:
    if not result:
        return ("## Evaluation\n\nNot evaluated yet: `vaekit evaluate RUN_DIR` estimates log p(x) "
                "by importance sampling and updates this card.\n")
    rows = [("log p(x), importance sampled (IWAE bound)", "log_px"),
            ("log p(x), naive (z from the prior)", "log_px_naive"), ("ELBO", "elbo"),
            ("ELBO gap, log p(x) − ELBO", "elbo_gap"), ("bits per dimension", "bits_per_dim")]
    table = [f"| {name} | {_with_se(result, key, 4 if 'bits' in key else 2)} |"
             for name, key in rows if key in result]
    if isinstance(result.get("active_units"), int):
        table.append(f"| active units | {result['active_units']} |")
    of = result.get("likelihood_of")
    return (f"## Evaluation\n\n`vaekit evaluate`: {result.get('split', 'test')} split, "
            f"{result.get('n', 'n/a')} examples, k = {result.get('k', 'n/a')} samples per "
            "example, nats per example ± Monte Carlo standard error"
            + (f"; log p(x) is the likelihood of: {of}" if isinstance(of, str) else "")
            + ".\n\n| figure | value |\n|---|---|\n" + "\n".join(table) + "\n")


def run_card(document: dict, metrics: list[dict], evaluation: dict | None, model: dict,
             name: str, has_samples: bool) -> str:
    """The card of a run folder: its config.json document (runs.read_run_document, with the
    TrainConfig as a dict), metrics.jsonl's rows, evaluation.json (or None) and the ModelConfig
    it builds (as a dict)."""
    config, data, pipeline = document["config"], document["data"], document["pipeline"]
    labels = data.get("label_names") if model.get("num_classes") else None
    image = len(model["data_shape"]) == 3
    parts = [
        _front_matter(data.get("name"), image),
        f"# {name}\n\nA vaekit model: {describe_model(model, labels)}\n",
        f"## Data\n\n{data.get('name')} ({data.get('n_train')} training and "
        f"{data.get('n_test')} test examples of shape "
        f"{'x'.join(map(str, data.get('shape', [])))}; source: {data.get('source')}). What "
        f"the likelihood scores: {pipeline.get('description')}. Inputs go through that "
        "pipeline first (`vaekit.load_run` returns it with the model).\n",
        _training_section(config, metrics),
        _evaluation_section(evaluation),
    ]
    return "\n".join(parts + _closing(name, document.get("vaekit_version"), has_samples))


def model_card(model: dict, label_names: list[str] | None, name: str, version: str,
               has_samples: bool) -> str:
    """The card of a model saved without its run (save_pretrained of a model built in Python)."""
    image = len(model["data_shape"]) == 3
    parts = [_front_matter(None, image),
             f"# {name}\n\nA vaekit model: {describe_model(model, label_names)}\n",
             "Saved from Python with `save_pretrained`: no training run, data or evaluation is "
             "recorded with it.\n"]
    return "\n".join(parts + _closing(name, version, has_samples))


def _closing(name: str, version, has_samples: bool) -> list[str]:
    """The sample grid (where there is one), how to load the model, and what wrote the card."""
    samples = [f"## Samples\n\nE[x | z] for z drawn from the prior:\n\n"
               f"![samples]({SAMPLES_NAME})\n"] if has_samples else []
    return samples + [_usage(name), f"Written by vaekit {version}.\n"]


def write_run_card(run_dir: Path) -> Path:
    """Write (or refresh) RUN_DIR/README.md from the run's files, atomically (runs.py)."""
    from .runs import (atomic_write_text, model_config_for, read_evaluation, read_metrics,
                       read_run_document)

    run_dir = Path(run_dir)
    document = read_run_document(run_dir)
    config = document["config"]
    model = model_config_for(config, tuple(document["data"]["shape"]),
                             document["data"]["label_names"]).to_dict()
    text = run_card({**document, "config": config.to_dict()}, read_metrics(run_dir),
                    read_evaluation(run_dir), model, run_dir.name,
                    (run_dir / SAMPLES_NAME).is_file())
    target = run_dir / CARD_NAME
    atomic_write_text(target, text)
    return target
