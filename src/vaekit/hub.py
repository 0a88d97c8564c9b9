"""Sharing models as the Hugging Face Hub does: save_pretrained, from_pretrained, push.

A saved model is a folder the Hub's ModelHubMixin conventions describe:

    config.json         {"format": "vaekit-model/1", "model": ModelConfig as JSON, ...}
    model.safetensors   the weights (no pickle)
    README.md           the model card (model_card.py), samples.png its sample grid

A run folder (`vaekit train`) holds the same three files (its config.json is the run's, format
vaekit-run/1), so it is loadable as it is and can be uploaded as it is (`vaekit push`).
`from_pretrained` takes either folder, or a Hub repository id, which huggingface_hub (the `hub`
extra) downloads into its cache first. Everything read is checked as a run folder is: shapes
against the weight file's header before anything is built, the memory limit, finite weights.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from . import jsonio
from .config import TrainConfig, options_from_file
from .errors import ConfigError, RunError
from .model import LatentModel, ModelConfig, build_vae
from .model_card import CARD_NAME, SAMPLES_NAME, model_card, write_run_card
from .runs import (
    RUN_FORMAT,
    atomic_write_bytes,
    atomic_write_json,
    check_model_memory,
    check_weight_shapes,
    load_run,
    load_state,
    model_shapes,
    safetensors_shapes,
    tensors_from_file,
    tensors_to_bytes,
    writing,
)

MODEL_FORMAT = "vaekit-model/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# What a Hub repository of a vaekit model holds that loading or reading it needs; checkpoints/,
# the lock and the caches of a run folder are not uploaded or downloaded.
SHARED_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, "pipeline.safetensors", "metrics.jsonl",
                "evaluation.json", "*.png")
HUB_EXTRA = "pip install 'vaekit[hub]'"
SAMPLE_GRID = 64  # images in a saved model's samples.png
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _huggingface_hub(what: str):
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError(f"{what} needs huggingface_hub, which is not installed: "
                          f"{HUB_EXTRA}") from None
    return huggingface_hub


# ------------------------------------------------------------------------------------------------
# Saving


def model_document(model: LatentModel, label_names: list[str] | None = None) -> dict:
    """config.json of a saved model: the ModelConfig that rebuilds it."""
    from . import __version__

    if model.model_config is None:
        raise ConfigError("this model was put together by hand, so nothing says how to rebuild "
                          "it; build it with vaekit.build_vae(ModelConfig(...)) (or load a run) "
                          "to save it")
    if label_names is not None and len(label_names) != (model.num_classes or 0):
        raise ConfigError(f"label_names has {len(label_names)} names but the model has "
                          f"{model.num_classes or 0} classes; give one name per class")
    return {"format": MODEL_FORMAT, "vaekit_version": __version__,
            "model": model.model_config.to_dict(), "label_names": label_names}


def save_pretrained(model: LatentModel, save_directory, *,
                    label_names: list[str] | None = None) -> Path:
    """Write config.json, model.safetensors, samples.png and README.md into save_directory."""
    folder = Path(save_directory)
    document = model_document(model, label_names)
    if (folder / CONFIG_NAME).is_file() and _format_of(folder) == RUN_FORMAT:
        raise RunError(f"{folder} is a training run; save into another folder (the run is "
                       "loadable and uploadable as it is)")
    with writing("cannot save the model", folder, "choose a writable folder"):
        folder.mkdir(parents=True, exist_ok=True)
        # the safetensors metadata of the Hub's PyTorch mixin: {"format": "pt"}
        atomic_write_bytes(folder / WEIGHTS_NAME, tensors_to_bytes(dict(model.state_dict()),
                                                                  {"format": "pt"}))
        atomic_write_json(folder / CONFIG_NAME, document)
        _write_sample_grid(model, folder / SAMPLES_NAME, label_names)
        from . import __version__

        card = model_card(document["model"], label_names, folder.name or "vaekit model",
                          __version__, has_samples=True)
        atomic_write_bytes(folder / CARD_NAME, card.encode("utf-8"))
    return folder


def _write_sample_grid(model: LatentModel, path: Path, label_names: list[str] | None) -> None:
    """E[x | z] of SAMPLE_GRID prior draws (seed 0), values clipped to [0, 1] for display."""
    from .viz import class_rows_image, examples_image, save_png

    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    y = None
    if model.conditional:
        per_class = max(1, SAMPLE_GRID // model.num_classes)
        y = torch.arange(model.num_classes, device=device).repeat_interleave(per_class)
    with torch.inference_mode():
        count = SAMPLE_GRID if y is None else len(y)
        code = model.sample_codes(count, generator=generator, y=y).to(device)  # (n, code_dim)
        images = model.decode(code, y).mean.float().cpu()  # (n, *data_shape)
    model.train(was_training)
    if y is not None:
        names = label_names or [str(c) for c in range(model.num_classes)]
        save_png(class_rows_image(images, names), path)
    else:
        save_png(examples_image(images), path)


# ------------------------------------------------------------------------------------------------
# Loading


def _format_of(folder: Path) -> str | None:
    try:
        document = jsonio.read_json(folder / CONFIG_NAME, "config.json", error=ConfigError)
    except ConfigError:
        return None
    return document.get("format") if isinstance(document, dict) else None


def resolve_source(source, *, revision: str | None = None, cache_dir=None, token=None,
                   local_files_only: bool = False) -> Path:
    """A local folder as it is; a Hub repository id downloaded into huggingface_hub's cache."""
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise RunError(f"{text} is a file; give the folder that holds config.json and "
                       "model.safetensors")
    if not _REPO_ID.match(text):
        raise RunError(f"{text}: no such folder, and not a Hub repository id (owner/name); give "
                       "a folder save_pretrained or vaekit train wrote, or an id such as "
                       "someone/vaekit-digits")
    hub = _huggingface_hub(f"loading {text} from the Hugging Face Hub")
    try:
        return Path(hub.snapshot_download(text, revision=revision, cache_dir=cache_dir,
                                          token=token, local_files_only=local_files_only,
                                          allow_patterns=list(SHARED_FILES)))
    except Exception as exc:  # noqa: BLE001 (offline, not found, gated: all one line)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{text}: cannot download it from the Hugging Face Hub ({reason}); check "
                       "the id and the network, or give a local folder") from None


def read_model_document(folder: Path) -> tuple[ModelConfig, list[str] | None]:
    """The ModelConfig of a saved model's config.json, checked as a run's options are."""
    path = folder / CONFIG_NAME
    document = jsonio.read_json(path, "config.json", error=ConfigError,
                                fix="restore the model's original config.json")
    fix = "; restore the model's original config.json"
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise ConfigError(f"{path}: not a vaekit model (no \"model\" object){fix}")
    values = dict(document["model"])
    shape, classes = values.pop("data_shape", None), values.pop("num_classes", None)
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ConfigError(f"{path}: 'data_shape' must be a list of positive integers{fix}")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                or not 1 <= classes <= 10_000):
        raise ConfigError(f"{path}: 'num_classes' must be null or 1 to 10,000{fix}")
    fields = set(ModelConfig.model_fields())
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown model option {unknown[0]!r}; it was written by a "
                          "newer vaekit (pip install -U vaekit) or edited by hand")
    options = options_from_file(values, str(path))  # types, as config.json's are checked
    # ranges and the cross-field rules of the training options; the likelihood is settled
    TrainConfig(**options).validate()
    names = document.get("label_names")
    if names is not None and (not isinstance(names, list) or len(names) != (classes or 0)
                              or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{path}: 'label_names' must list one name per class{fix}")
    return ModelConfig(data_shape=tuple(shape), num_classes=classes, **options), names


def load_saved_model(folder: Path, device="cpu") -> LatentModel:
    """The model of a folder save_pretrained wrote."""
    model_config, _ = read_model_document(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise RunError(f"{folder}: {WEIGHTS_NAME} is missing; the folder is incomplete, save or "
                       "download it again")
    try:
        shapes = model_shapes(model_config)  # the meta device: nothing allocated
    except ValueError as exc:
        raise ConfigError(f"{folder / CONFIG_NAME}: {exc}") from None
    check_weight_shapes(shapes, safetensors_shapes(weights), weights)
    check_model_memory(shapes, str(folder / CONFIG_NAME), copies=1,
                       fix="restore the model's original config.json")
    model = build_vae(model_config)
    load_state(model, tensors_from_file(weights), weights)
    return model.to(device).eval()


def from_pretrained(source, *, expected: type = LatentModel, revision: str | None = None,
                    cache_dir=None, token=None, local_files_only: bool = False,
                    device="cpu") -> LatentModel:
    """The model of a saved-model folder, a run folder or a Hub repository id."""
    folder = resolve_source(source, revision=revision, cache_dir=cache_dir, token=token,
                            local_files_only=local_files_only)
    if not (folder / CONFIG_NAME).is_file():
        raise RunError(f"{folder}: no config.json; give a folder save_pretrained or vaekit train "
                       "wrote")
    kind = _format_of(folder)
    model = load_run(folder, device).model if kind == RUN_FORMAT else \
        load_saved_model(folder, device)
    if not isinstance(model, expected):
        raise ConfigError(f"{source} holds a {type(model).__name__}, not a {expected.__name__}; "
                          f"load it with {type(model).__name__}.from_pretrained or "
                          "vaekit.model.LatentModel.from_pretrained")
    return model


# ------------------------------------------------------------------------------------------------
# Uploading


def files_to_push(folder: Path) -> list[Path]:
    """The files of a run or saved-model folder that go to the Hub, relative to it (its own
    plain files matching SHARED_FILES; never checkpoints/, the lock, caches or links)."""
    import fnmatch

    chosen = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        if any(fnmatch.fnmatch(path.name, pattern) for pattern in SHARED_FILES):
            chosen.append(Path(path.name))
    return chosen


def push_folder(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                log=print) -> str:
    """Upload a run (its model card refreshed first) or saved-model folder to the Hub."""
    folder = Path(folder)
    if not _REPO_ID.match(repo_id):
        raise ConfigError(f"{repo_id!r} is not a Hub repository id: give owner/name, such as "
                          "someone/vaekit-digits")
    kind = _format_of(folder) if (folder / CONFIG_NAME).is_file() else None
    if kind == RUN_FORMAT:
        load_run(folder)  # the run must load before anyone downloads it
        with writing("cannot write the model card", folder, "make the run folder writable"):
            write_run_card(folder)
    elif kind == MODEL_FORMAT:
        load_saved_model(folder)
    else:
        raise RunError(f"{folder}: not a vaekit run or saved model (no vaekit config.json); give "
                       "a folder vaekit train or save_pretrained wrote")
    hub = _huggingface_hub("vaekit push")
    files = files_to_push(folder)
    api = hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 allow_patterns=[str(f) for f in files],
                                 commit_message=f"Upload {folder.name} with vaekit push")
    except Exception as exc:  # noqa: BLE001 (network, authentication, permissions: one line)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot upload {folder} to {repo_id} ({reason}); log in with `hf auth "
                       "login` (or set HF_TOKEN) and check the network") from None
    log(f"uploaded {len(files)} files of {folder} to {repo_id}")
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def push_model(model: LatentModel, repo_id: str, *, private: bool = False,
               token: str | None = None, label_names: list[str] | None = None) -> str:
    """save_pretrained into a temporary folder, then push_folder."""
    with tempfile.TemporaryDirectory(prefix="vaekit-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / repo_id.split("/")[-1],
                                 label_names=label_names)
        return push_folder(folder, repo_id, private=private, token=token,
                           log=lambda *a, **k: None)
