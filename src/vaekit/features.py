"""The feature network that sample-quality scores are measured in, trained by vaekit offline.

Scores such as the Frechet distance compare samples and real examples in a feature space. The
usual one, Inception-v3 trained on ImageNet, needs a download and describes natural RGB photos,
not 8x8 digits or tabular arrays. vaekit instead trains one small network per dataset on the
dataset's own training examples:

- with class labels, a classifier (cross-entropy): its features keep what tells the classes apart,
  as Inception's do for ImageNet, and its predictions judge whether a conditional run's samples
  show the requested class;
- without labels, an autoencoder (its code reconstructs the standardised input, squared error):
  the honest choice when no task defines what matters. Its features keep whatever explains the
  most pixel variance, so they are more sensitive to blur and noise and less to semantic changes
  (a sample of the wrong kind that has the right pixel statistics) than a classifier's; scores
  from the two kinds are not comparable with each other.

The network is saved as safetensors in the cache, `cache_dir()/features/FINGERPRINT.safetensors`,
keyed by the SHA-256 of the data (`Dataset.fingerprint`), written atomically, and reused by every
run on the same data, so their scores are comparable. Training is seeded and fixed (steps, batch,
learning rate): one recipe for every dataset.

    images (C, H, W)   3 convolutions (16, 32, 64 channels, two of stride 2), mean-pooled to
                       4 x 4 (where a shape is kept; a global mean lost a third of the accuracy
                       on Fashion-MNIST), linear -> 64 features
    other data (D,)    MLP D -> 256 -> 64 features

The features are the 64 outputs of that last linear layer (before the head's ReLU), each
standardised by its mean and standard deviation over the training data. Inputs are the data's
own units (images in [0, 1]), standardised by the training data's overall mean and standard
deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import Dataset, cache_dir
from .errors import DataError
from .randomness import derive_seed, seeded_generator

FORMAT_VERSION = 1
FEATURES = 64  # dimensions: enough for 10 classes' structure, small enough for exact 64x64 FD
TRAIN_STEPS = 1500  # with batch 128: about 3 epochs of Fashion-MNIST ...
MAX_EPOCHS = 40  # ... and at most 40 epochs of small data (the digits: 450 steps)
BATCH_SIZE = 128
LEARNING_RATE = 2e-3


def is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4


def data_units(dataset: Dataset, raw: Tensor) -> Tensor:
    """Raw examples in the data's own units: 8-bit images in [0, 1], arrays as they are."""
    return raw.float() / 255.0 if dataset.kind == "image8" else raw.float()


class FeatureNet(nn.Module):
    """x in data units (B, *shape) -> features (B, 64); a head on top for training."""

    def __init__(self, shape: tuple[int, ...], num_classes: int | None):
        super().__init__()
        self.shape = tuple(shape)
        self.num_classes = num_classes
        if is_image(self.shape):
            channels = self.shape[0]
            self.trunk = nn.Sequential(
                nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, FEATURES))
        else:
            self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(self.shape), 256),
                                       nn.ReLU(), nn.Linear(256, FEATURES))
        outputs = num_classes if num_classes else math.prod(self.shape)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, outputs))
        # the training data's overall mean and sd: set by training, saved with the weights
        self.register_buffer("input_mean", torch.zeros(()))
        self.register_buffer("input_std", torch.ones(()))
        # each feature's mean and sd over the training data, so features are O(1), as KID's
        # kernel (x.y / F + 1)^3 assumes, and Frechet distances are in units of their spread
        self.register_buffer("feature_mean", torch.zeros(FEATURES))
        self.register_buffer("feature_std", torch.ones(FEATURES))

    @property
    def kind(self) -> str:
        return "classifier" if self.num_classes else "autoencoder"

    def standardise(self, x: Tensor) -> Tensor:
        return (x - self.input_mean) / self.input_std

    def hidden(self, x: Tensor) -> Tensor:
        """The trunk's output, what the head reads. (B, FEATURES)"""
        return self.trunk(self.standardise(x))

    def forward(self, x: Tensor) -> Tensor:
        return (self.hidden(x) - self.feature_mean) / self.feature_std  # (B, FEATURES)

    def head_output(self, x: Tensor) -> Tensor:
        """Class logits (B, classes), or the reconstruction (B, D) of the standardised input."""
        return self.head(self.hidden(x))


@dataclass
class Features:
    """A trained feature network and the facts reported beside every score made with it."""

    net: FeatureNet
    info: dict  # kind, dimensions, steps, test score, file, fingerprint

    def __post_init__(self):
        # channels-last images run the convolutions about twice as fast on CPU (oneDNN)
        self.net.to(memory_format=torch.channels_last)

    def _batches(self, x: Tensor, batch: int):
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch].float().cpu()
            yield chunk.contiguous(memory_format=torch.channels_last) if chunk.dim() == 4 \
                else chunk

    def __call__(self, x: Tensor, batch: int = 512) -> Tensor:
        """Features (N, F) float64 on the CPU of examples in data units (N, *shape): F = 64 for
        vaekit's own network (a pretrained one says its own batch size and F in info)."""
        batch = self.info.get("batch", batch)
        with torch.inference_mode():
            out = [self.net(chunk).double() for chunk in self._batches(x, batch)]
        dims = self.info.get("dimensions", FEATURES)
        return torch.cat(out) if out else torch.empty(0, dims, dtype=torch.float64)

    def predict(self, x: Tensor, batch: int = 512) -> Tensor:
        """The classifier's class of each example (N,); only for classifier features."""
        if self.net.num_classes is None:
            raise ValueError("these features come from an autoencoder: no classes to predict")
        with torch.inference_mode():
            return torch.cat([self.net.head_output(chunk).argmax(1)
                              for chunk in self._batches(x, batch)])


def feature_file(dataset: Dataset) -> Path:
    return cache_dir() / "features" / f"{dataset.fingerprint()}.safetensors"


def _labelled(dataset: Dataset) -> bool:
    return dataset.train_y is not None and dataset.test_y is not None and bool(dataset.label_names)


def _loss(net: FeatureNet, x: Tensor, y: Tensor | None) -> Tensor:
    out = net.head_output(x)  # (B, classes) or (B, D)
    if net.num_classes:
        return nn.functional.cross_entropy(out, y)
    return (out - net.standardise(x).flatten(1)).square().mean()


def train_feature_net(dataset: Dataset, steps: int | None = None, log=None) -> Features:
    """Train the feature network on the dataset's training split (seeded, CPU)."""
    if steps is None:
        steps = min(TRAIN_STEPS, math.ceil(MAX_EPOCHS * len(dataset.train_x) / BATCH_SIZE))
    num_classes = len(dataset.label_names) if _labelled(dataset) else None
    train_x = data_units(dataset, dataset.train_x)  # (N, *shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "feature-net"))
        net = FeatureNet(dataset.shape, num_classes)
    net.input_mean.fill_(float(train_x.mean()))
    net.input_std.fill_(max(float(train_x.std()), 1e-6))
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = seeded_generator(derive_seed(0, "feature-net-batches"))
    net.train()
    for step in range(steps):
        index = torch.randint(len(train_x), (min(BATCH_SIZE, len(train_x)),), generator=generator)
        loss = _loss(net, train_x[index], None if num_classes is None else dataset.train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step + 1) % 250 == 0:
            log(f"features: step {step + 1} of {steps}, loss {loss.item():.4f}")
    net.eval()
    test_x = data_units(dataset, dataset.test_x)
    with torch.inference_mode():
        hidden = torch.cat([net.hidden(train_x[i:i + 1024]) for i in range(0, len(train_x), 1024)])
        net.feature_mean.copy_(hidden.mean(0))
        net.feature_std.copy_(hidden.std(0).clamp_min(1e-6))
        if num_classes:
            predicted = torch.cat([net.head_output(test_x[i:i + 1024]).argmax(1)
                                   for i in range(0, len(test_x), 1024)])
            test_score = {"test_accuracy": float((predicted == dataset.test_y).float().mean())}
        else:
            error = sum(float(_loss(net, test_x[i:i + 1024], None)) * len(test_x[i:i + 1024])
                        for i in range(0, len(test_x), 1024)) / len(test_x)
            test_score = {"test_reconstruction_r2": 1.0 - error}  # inputs have unit variance
    info = {"kind": net.kind, "dimensions": FEATURES, "steps": steps, "batch_size": BATCH_SIZE,
            "format": FORMAT_VERSION, "fingerprint": dataset.fingerprint(),
            "num_classes": num_classes, "shape": list(dataset.shape), **test_score}
    return Features(net, info)


def _describe(info: dict) -> dict:
    return {key: value for key, value in info.items() if key != "format"}


def save_features(features: Features, path: Path) -> None:
    import json

    from .runs import atomic_write_bytes, tensors_to_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"vaekit_features": json.dumps(features.info)}
    atomic_write_bytes(path, tensors_to_bytes(dict(features.net.state_dict()), metadata))


def load_features(path: Path, dataset: Dataset) -> Features:
    """The cached network of this dataset; one-line DataError if the file is not one."""
    from . import jsonio

    from safetensors import SafetensorError, safe_open

    fix = f"delete {path} and vaekit trains it again"
    try:
        with safe_open(str(path), framework="pt") as handle:
            info = jsonio.loads((handle.metadata() or {}).get("vaekit_features", "null"),
                                str(path), error=DataError, fix=fix)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: not a readable feature network ({str(exc).splitlines()[0]}); "
                        f"{fix}") from None
    if not isinstance(info, dict) or info.get("fingerprint") != dataset.fingerprint() or \
            info.get("format") != FORMAT_VERSION or info.get("shape") != list(dataset.shape):
        raise DataError(f"{path}: holds no feature network of these data (format "
                        f"{FORMAT_VERSION}); {fix}")
    net = FeatureNet(dataset.shape, info.get("num_classes"))
    try:
        net.load_state_dict(tensors)
    except RuntimeError:
        raise DataError(f"{path}: its weights do not fit the feature network; {fix}") from None
    net.eval()
    return Features(net, info)


def features_for(dataset: Dataset, log=None) -> Features:
    """The dataset's feature network: from the cache, else trained now and cached."""
    path = feature_file(dataset)
    if path.is_file():
        features = load_features(path, dataset)
        features.info = {**features.info, "file": str(path), "cached": True}
        return features
    if log:
        log(f"features: training a {'classifier' if _labelled(dataset) else 'autoencoder'}"
            f" on {len(dataset.train_x):,} training examples of {dataset.name} (once per dataset; "
            f"cached in {path})")
    features = train_feature_net(dataset, log=log)
    try:
        save_features(features, path)
    except OSError as exc:
        from .runs import describe_os_error

        raise DataError(f"cannot cache the feature network: {describe_os_error(exc, path)}; set "
                        "VAEKIT_CACHE to a writable folder") from None
    features.info = {**features.info, "file": str(path), "cached": False}
    return features


def describe(features: Features) -> dict:
    """What evaluation.json records about the features."""
    return _describe(features.info)
