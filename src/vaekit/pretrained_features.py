"""Standard pretrained features for sample-quality scores of natural RGB images: DINOv2.

vaekit's own feature network (features.py) is trained on each dataset and needs no download.
For natural RGB images, the field compares models in the features of a large network trained on
ImageNet-scale data; dgm-eval (Stein et al. 2023) found DINOv2 ViT features to rank generative
models as people do, better than Inception-v3's. Where a user has a DINOv2 checkpoint on disk
(a Hugging Face folder: config.json and model.safetensors, such as `facebook/dinov2-base`
downloaded once with `huggingface-cli download`), `vaekit evaluate --sample-quality --features
dinov2:PATH` scores in its features. vaekit never downloads it at run time, and loads weights
from safetensors only, never from a pickle.

    images (C, H, W) in [0, 1]   grey repeated to 3 channels, resized to the model's input size
                                 (config.image_size, 224 for the released models; bicubic, with
                                 antialiasing), normalised by ImageNet's mean and standard
                                 deviation, as DINOv2 was trained
    features                     the class token of the last layer after its layer norm
                                 (pooler_output), as dgm-eval takes them; not standardised

Needs the optional extra `vaekit[dinov2]` (transformers).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional

from .data import cache_dir
from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("dinov2",)
BATCH = 64  # images per forward pass: a ViT-B at 224 x 224 holds ~0.5 GB of activations


class DINOv2Net(nn.Module):
    """Images in [0, 1] (B, C, H, W) -> DINOv2's class-token features (B, hidden size)."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model.eval()
        self.image_size = image_size
        self.num_classes = None  # no classifier head: no class agreement in these features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W) grey as RGB
        x = functional.interpolate(x.float(), size=(self.image_size, self.image_size),
                                   mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).contiguous()  # (B, 3, S, S)
        return self.model(pixel_values=x).pooler_output  # (B, hidden)


def parse_features(spec: str) -> tuple[str, Path]:
    """`dinov2:PATH` -> ("dinov2", PATH), checked."""
    kind, _, path = spec.partition(":")
    if kind not in KINDS or not path:
        raise ConfigError(f"--features {spec}: expected dinov2:PATH, PATH a folder holding a "
                          "DINOv2 checkpoint (config.json and model.safetensors)")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--features {spec}: {folder} holds no config.json; give the folder "
                          "of a Hugging Face DINOv2 checkpoint (for example one downloaded with "
                          "`huggingface-cli download facebook/dinov2-base --local-dir DIR`)")
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"--features {spec}: {folder} holds no model.safetensors; vaekit "
                          "loads weights from safetensors only, never from a pickle "
                          "(pytorch_model.bin)")
    return kind, folder


def _digest(path: Path) -> str:
    """SHA-256 of the weights: the reference cache is keyed by it (a changed checkpoint is
    another feature space)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def load_pretrained_features(spec: str, dataset):
    """The `Features` of `--features dinov2:PATH` for the dataset's images."""
    from .features import Features, is_image

    kind, folder = parse_features(spec)
    shape = tuple(dataset.shape)
    if not (is_image(shape) and dataset.kind == "image8"):
        raise ConfigError(f"--features {spec} scores images, and {dataset.name} is not a set "
                          "of 8-bit images; leave --features out for vaekit's own features")
    try:
        from transformers import Dinov2Config, Dinov2Model
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise ConfigError("--features dinov2:PATH needs the transformers package: pip install "
                          "'vaekit[dinov2]'") from None
    transformers_logging.disable_progress_bar()  # vaekit prints its own progress
    try:
        config = Dinov2Config.from_pretrained(str(folder), local_files_only=True)
        model = Dinov2Model.from_pretrained(str(folder), config=config, local_files_only=True,
                                            use_safetensors=True)
    except Exception as exc:  # a damaged or foreign checkpoint: transformers and safetensors
        # raise several kinds (OSError, ValueError, SafetensorError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--features {spec}: cannot load the DINOv2 checkpoint in {folder} "
                          f"({first})") from None
    net = DINOv2Net(model, int(config.image_size))
    info = {"kind": kind, "source": str(folder), "dimensions": int(config.hidden_size),
            "image_size": int(config.image_size), "fingerprint": dataset.fingerprint(),
            "model_digest": _digest(folder / "model.safetensors"),
            "reference_dir": str(cache_dir() / "features"), "batch": BATCH}
    return Features(net, info)
