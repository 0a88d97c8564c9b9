"""A corpus of malformed inputs, each through the real `vaekit` command.

Every case must give exit status 2, one line on stderr that names the problem and the fix, no
traceback, and leave every file as it was (no file changed, none created). The cases are
generated here: IDX files, images, arrays, CSV, run folders, config.json, weights, options.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_vaekit, write_fake_mnist, write_idx

CASES: dict[str, tuple] = {}  # id -> (setup, problem words, fix words)


def case(name: str, problem: str, fix: str, registry: dict = CASES):
    """Register setup(folder, runs) -> CLI arguments; `problem` and `fix` must be in the error."""
    def register(setup):
        assert name not in registry
        registry[name] = (setup, problem, fix)
        return setup
    return register


def train(*args) -> list:
    return ["train", "--no-progress", "--epochs", "1", "--out", "run", *args]


def image(path: Path, size=(8, 8), mode="L", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "LA": (2,)}[mode]
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8),
                    mode).save(path)
    return path


def image_folder(folder: Path, n: int = 4, **kwargs) -> Path:
    folder.mkdir()
    for i in range(n):
        image(folder / f"{i}.png", seed=i, **kwargs)
    return folder


def npy(folder: Path, array, name: str = "data.npy") -> Path:
    np.save(folder / name, array)
    return folder / name


def csv(folder: Path, text: str, name: str = "data.csv") -> Path:
    (folder / name).write_text(text)
    return folder / name


def copy_run(runs: dict, key: str, folder: Path) -> Path:
    return Path(shutil.copytree(runs[key], folder / "run"))


def edit_config(run: Path, change) -> None:
    document = json.loads((run / "config.json").read_text())
    change(document)
    (run / "config.json").write_text(json.dumps(document))


GOOD = np.random.default_rng(0).random((20, 4))  # (20, 4) values in [0, 1]

# --- IDX files (mnist / fashion-mnist) ----------------------------------------------------------


def mnist(folder: Path, damage) -> list:
    data = write_fake_mnist(folder / "mnist", n_train=20, n_test=10, gz=False)
    damage(data / "train-images-idx3-ubyte")
    return train("--data", "mnist", "--data-dir", data)


case("idx-truncated", "truncated", "replace")(
    lambda f, r: mnist(f, lambda p: p.write_bytes(p.read_bytes()[:-100])))
case("idx-wrong-magic", "wrong magic number", "replace")(
    lambda f, r: mnist(f, lambda p: p.write_bytes(b"\x12\x34" + p.read_bytes()[2:])))
case("idx-float-elements", "not unsigned bytes", "original MNIST-format file")(
    lambda f, r: mnist(f, lambda p: p.write_bytes(b"\x00\x00\x0d" + p.read_bytes()[3:])))
case("idx-truncated-header", "truncated IDX header", "replace")(
    lambda f, r: mnist(f, lambda p: p.write_bytes(bytes([0, 0, 8, 3, 0, 0]))))
case("idx-zero-bytes", "empty", "replace")(lambda f, r: mnist(f, lambda p: p.write_bytes(b"")))
case("idx-not-gzip", "cannot read", "replace")(
    lambda f, r: mnist(f, lambda p: (p.unlink(), p.with_name(p.name + ".gz").write_bytes(
        b"this is not gzip data"))))
case("idx-gzip-truncated", "cannot read", "replace")(
    lambda f, r: mnist(f, lambda p: (p.with_name(p.name + ".gz").write_bytes(
        gzip.compress(p.read_bytes())[:200]), p.unlink())))


@case("idx-label-count", "expected images (N, H, W) and N labels", "check the files")
def _(folder, runs):
    data = write_fake_mnist(folder / "mnist", n_train=20, n_test=10, gz=False)
    write_idx(data / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    return train("--data", "mnist", "--data-dir", data)


@case("idx-missing-file", "t10k-labels-idx1-ubyte is missing", "add it")
def _(folder, runs):
    data = write_fake_mnist(folder / "mnist", n_train=20, n_test=10, gz=False)
    (data / "t10k-labels-idx1-ubyte").unlink()
    return train("--data", "mnist", "--data-dir", data)


case("idx-no-data-dir", "no such folder", "give the folder")(
    lambda f, r: train("--data", "mnist", "--data-dir", f / "nowhere"))

# --- image folders ------------------------------------------------------------------------------


@case("image-zero-bytes", "empty file", "remove or replace it")
def _(folder, runs):
    data = image_folder(folder / "images")
    (data / "9.png").write_bytes(b"")
    return train("--data", data)


@case("image-corrupt", "not a readable image", "remove or replace it")
def _(folder, runs):
    data = image_folder(folder / "images")
    (data / "9.png").write_bytes(np.random.default_rng(1).bytes(500))
    return train("--data", data)


for cut in (20, 40, 60, 90):
    def truncated(folder, runs, cut=cut):
        data = image_folder(folder / "images", size=(16, 16))
        whole = (data / "0.png").read_bytes()
        (data / "0.png").write_bytes(whole[:len(whole) * cut // 100])
        return train("--data", data)
    case(f"image-truncated-{cut}%", "not a readable image", "remove or replace it")(truncated)


@case("image-bad-crc", "not a readable image", "remove or replace it")
def _(folder, runs):
    data = image_folder(folder / "images", size=(16, 16))
    raw = bytearray((data / "0.png").read_bytes())
    raw[40] ^= 0xFF  # inside the image data: its chunk CRC no longer matches
    (data / "0.png").write_bytes(bytes(raw))
    return train("--data", data)


@case("image-dimensions-bomb", "not a readable image", "remove or replace it")
def _(folder, runs):
    """A PNG header claiming 100000 x 100000 pixels: refused before decoding."""
    data = image_folder(folder / "images")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = (lambda kind, body: struct.pack(">I", len(body)) + kind + body +
             struct.pack(">I", zlib.crc32(kind + body)))
    (data / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                                 chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    return train("--data", data)


@case("image-mixed-sizes", "differ in size (8x8 and 10x10)", "--image-size N")
def _(folder, runs):
    data = image_folder(folder / "images")
    image(data / "9.png", size=(10, 10))
    return train("--data", data)


@case("image-mixed-modes", "mixes greyscale and colour", "--channels 1 or --channels 3")
def _(folder, runs):
    data = image_folder(folder / "images")
    image(data / "9.png", mode="RGB")
    return train("--data", data)


@case("image-unreadable-with-skip-bad-images-off", "not a readable image",
      "pass --skip-bad-images")
def _(folder, runs):
    data = image_folder(folder / "images", n=6)
    (data / "3.png").write_bytes(b"GIF89a but not really")
    return train("--data", data)


@case("cifar10-short-record", "not a whole number of CIFAR-10 records", "binary version")
def _(folder, runs):
    bins = folder / "cifar" / "cifar-10-batches-bin"
    bins.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (bins / name).write_bytes(bytes(3073 * 2))
    (bins / "test_batch.bin").write_bytes(bytes(3073 * 2 - 1))
    return train("--data", "cifar10", "--data-dir", folder / "cifar")


@case("celeba-partition-list-damaged", "not 'NAME.jpg 0|1|2'", "original list_eval_partition")
def _(folder, runs):
    (folder / "celeba" / "img_align_celeba").mkdir(parents=True)
    image(folder / "celeba" / "img_align_celeba" / "000001.jpg", size=(178, 218))
    (folder / "celeba" / "list_eval_partition.txt").write_text("000001.jpg train\n")
    return train("--data", "celeba", "--data-dir", folder / "celeba")


case("image-empty-folder", "no images found", "give a folder of images")(
    lambda f, r: train("--data", Path(f / "empty").mkdir() or f / "empty"))


@case("image-no-image-files", "no images found", "give a folder of images")
def _(folder, runs):
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("no pictures here")
    return train("--data", folder / "notes")


@case("image-loose-and-classes", "both images and class sub-folders", "into a sub-folder")
def _(folder, runs):
    data = image_folder(folder / "images")
    image_folder(data / "cats")
    return train("--data", data)


case("image-single", "too few to hold out a test set", "add data")(
    lambda f, r: train("--data", image_folder(f / "images", n=1)))

# --- arrays and CSV -----------------------------------------------------------------------------

case("npy-nan", "non-finite value (nan)", "remove or fill missing values")(
    lambda f, r: train("--data", npy(f, np.where(np.eye(20, 4) > 0, np.nan, GOOD))))
case("npy-inf", "non-finite value (inf)", "remove or fill missing values")(
    lambda f, r: train("--data", npy(f, np.where(np.eye(20, 4) > 0, np.inf, GOOD))))
case("npy-beyond-float32", "beyond the 32-bit float range", "rescale the data")(
    lambda f, r: train("--data", npy(f, np.where(np.eye(20, 4) > 0, 1e300, GOOD))))
case("npy-strings", "not numbers", "save a numeric array")(
    lambda f, r: train("--data", npy(f, np.array([["a", "b"], ["c", "d"]]))))
case("npy-complex", "not numbers", "save a numeric array")(
    lambda f, r: train("--data", npy(f, GOOD + 1j)))
case("npy-one-dimensional", "has shape (20,)", "expected (examples, features...)")(
    lambda f, r: train("--data", npy(f, GOOD[:, 0])))
case("npy-no-examples", "has shape (0, 4)", "at least one example")(
    lambda f, r: train("--data", npy(f, GOOD[:0])))
case("npy-two-channels", "expected 1 or 3 channels", "(N, C, H, W) or (N, H, W, C)")(
    lambda f, r: train("--data", npy(f, np.zeros((10, 2, 8, 8), dtype=np.uint8))))
case("npy-truncated", "not a readable .npy file", "save it with np.save")(
    lambda f, r: train("--data", (lambda p: p.write_bytes(p.read_bytes()[:150]) and p)(
        npy(f, GOOD))))
case("npy-out-of-range-bernoulli", "scores values in [0, 1]", "--likelihood gaussian")(
    lambda f, r: train("--data", npy(f, GOOD * 4 - 2), "--likelihood", "bernoulli"))
case("npy-out-of-range-cb", "continuous-bernoulli likelihood scores values in [0, 1]",
     "rescale the data")(
    lambda f, r: train("--data", npy(f, GOOD * 3), "--likelihood", "continuous-bernoulli"))
case("npz-no-x", "no array named 'x'", "np.savez(file, x=data")(
    lambda f, r: (np.savez(f / "d.npz", a=GOOD, b=GOOD), train("--data", f / "d.npz"))[1])
case("npz-test-shape", "does not match", "same shape and dtype")(
    lambda f, r: (np.savez(f / "d.npz", x=GOOD, x_test=GOOD[:, :3]),
                  train("--data", f / "d.npz"))[1])
case("npz-negative-labels", "class numbers", "non-negative integers")(
    lambda f, r: (np.savez(f / "d.npz", x=GOOD, y=-np.ones(20)), train("--data", f / "d.npz"))[1])
case("npz-label-count", "has shape (5,), expected (20,)", "one label per example")(
    lambda f, r: (np.savez(f / "d.npz", x=GOOD, y=np.zeros(5)), train("--data", f / "d.npz"))[1])
case("npz-corrupt", "not a readable .npz file", "np.savez")(
    lambda f, r: ((f / "d.npz").write_bytes(b"PK\x03\x04 broken"), train("--data", f / "d.npz"))[1])
case("csv-nan", "non-finite value (nan)", "remove or fill missing values")(
    lambda f, r: train("--data", csv(f, "a,b\n0.1,0.2\nnan,0.3\n0.5,0.6\n")))
case("csv-inf", "non-finite value (-inf)", "remove or fill missing values")(
    lambda f, r: train("--data", csv(f, "0.1,0.2\n-inf,0.3\n0.5,0.6\n")))
case("csv-string", "line 3, column 2 ('b') is 'abc', not a number", "must be numeric")(
    lambda f, r: train("--data", csv(f, "a,b\n0.1,0.2\n0.3,abc\n")))
case("csv-class-names-unnamed-column", "column 2 ('diagnosis') is 'benign'",
     "named one of label, labels, y, class, target")(
    lambda f, r: train("--data", csv(f, "a,diagnosis\n0.1,benign\n0.3,malignant\n")))
case("csv-empty-label", "line 3 has an empty 'Label'", "give every row its class")(
    lambda f, r: train("--data", csv(f, "a,Label\n0.1,cat\n0.2,\n0.3,dog\n")))
case("patience-without-validation", "--validation-fraction 0 holds no validation rows",
     "give --validation-fraction 0.2")(
    lambda f, r: train("--patience", "5", "--validation-fraction", "0"))
case("validation-fraction-too-large", "--validation-fraction must be at most 0.5", "0.5")(
    lambda f, r: train("--validation-fraction", "0.9"))
case("dataset-misspelt", "unknown dataset 'fashion-mnst' (did you mean fashion-mnist?)",
     "use digits, mnist")(
    lambda f, r: train("--data", "fashion-mnst"))
case("csv-ragged", "line 2 has 3 columns, expected 2", "same number of values")(
    lambda f, r: train("--data", csv(f, "0.1,0.2\n0.3,0.4,0.5\n")))
case("csv-empty", "empty CSV file", "one row of numbers per example")(
    lambda f, r: train("--data", csv(f, "")))
case("csv-header-only", "header but no rows", "rows of data")(
    lambda f, r: train("--data", csv(f, "a,b,c\n")))
case("csv-only-labels", "only a label column", "add feature columns")(
    lambda f, r: train("--data", csv(f, "label\n1\n2\n")))
case("csv-not-text", "cannot read as UTF-8 text", "save it as a CSV file")(
    lambda f, r: ((f / "d.csv").write_bytes(b"\xff\xfe\x00\x81" * 50),
                  train("--data", f / "d.csv"))[1])
case("unsupported-file-type", "unsupported file type '.txt'", ".npy, .npz or .csv")(
    lambda f, r: ((f / "d.txt").write_text("1,2"), train("--data", f / "d.txt"))[1])
case("unknown-dataset", "unknown dataset 'mnits'", "use digits, mnist, fashion-mnist")(
    lambda f, r: train("--data", "mnits"))
case("conv-on-vectors", "--net conv needs images", "use --net mlp")(
    lambda f, r: train("--data", npy(f, GOOD), "--net", "conv"))
case("batch-larger-than-data", "larger than the 16 training examples", "lower --batch-size")(
    lambda f, r: train("--data", npy(f, GOOD), "--batch-size", "64"))

# --- run folders, config.json and weights -------------------------------------------------------

case("run-does-not-exist", "no such run folder", "give the folder `vaekit train` wrote")(
    lambda f, r: ["sample", f / "nowhere"])


@case("run-missing-config", "no config.json", "give the folder `vaekit train` wrote")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    (run / "config.json").unlink()
    return ["sample", run]


@case("run-missing-weights", "model.safetensors is missing", "--resume")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    (run / "model.safetensors").unlink()
    return ["sample", run]


@case("run-missing-pipeline", "pipeline.safetensors is missing", "restore it or retrain")
def _(folder, runs):
    run = copy_run(runs, "real", folder)
    (run / "pipeline.safetensors").unlink()
    return ["sample", run]


@case("run-missing-checkpoint-file", "no complete checkpoint to resume from", "start a new run")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "optimizer.safetensors").unlink()
    return ["train", "--resume", run, "--epochs", "9"]


@case("config-not-json", "not valid JSON", "restore the run's original config.json")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    (run / "config.json").write_text('{"format": "vaekit-run/1", ')
    return ["sample", run]


@case("config-unknown-key", "option 'colour', unknown to vaekit", "remove the key")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d["config"].update(colour="blue"))
    return ["sample", run]


@case("config-missing-key", "lacks key 'latent_dim'", "restore it or retrain")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d["config"].pop("latent_dim"))
    return ["reconstruct", run]


@case("config-wrong-type", "'latent_dim' must be an integer, got '4'", "correct it")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d["config"].update(latent_dim="4"))
    return ["sample", run]


@case("config-out-of-range", "--latent-dim must be at least 1, got 0", "correct it")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d["config"].update(latent_dim=0))
    return ["sample", run]


@case("config-unknown-section-key", "unknown key 'extra'", "restore the run's original")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d.update(extra=1))
    return ["sample", run]


@case("config-data-shape", "'shape' must be a list of positive integers", "restore")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d["data"].update(shape=[1, -8, 8]))
    return ["sample", run]


@case("config-other-format", "vaekit-run/9, a newer format", "upgrade vaekit")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d.update(format="vaekit-run/9"))
    return ["sample", run]


@case("weights-shape-mismatch", "has shape", "config.json of the run that wrote these weights")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d["config"].update(hidden=[65]))
    return ["sample", run]


@case("weights-missing-tensor", "lacks", "config.json of the run that wrote these weights")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    edit_config(run, lambda d: d["config"].update(hidden=[64, 64]))
    return ["sample", run]


@case("weights-corrupt", "not a readable safetensors file", "restore the file or retrain")
def _(folder, runs):
    run = copy_run(runs, "mlp", folder)
    (run / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    return ["sample", run]


@case("weights-wrong-dtype", "expected torch.float32", "restore the run's model.safetensors")
def _(folder, runs):
    from safetensors.torch import load_file, save_file

    run = copy_run(runs, "mlp", folder)
    tensors = load_file(run / "model.safetensors")
    save_file({k: v.double() for k, v in tensors.items()}, run / "model.safetensors")
    return ["sample", run]


@case("resume-changed-option", "--lr cannot change when resuming", "only --epochs")
def _(folder, runs):
    return ["train", "--resume", copy_run(runs, "mlp", folder), "--lr", "0.1"]


@case("out-not-empty", "already exists and is not empty", "choose another --out")
def _(folder, runs):
    (folder / "run").mkdir()
    (folder / "run" / "keep.txt").write_text("mine")
    return train()


@case("out-is-a-file", "is a file, not a folder", "choose another --out")
def _(folder, runs):
    (folder / "run").write_text("mine")
    return train()


# --- options: unknown choices and nonsensical numbers -------------------------------------------

for flag, value, problem, fix in [
    ("--likelihood", "poisson", "'poisson' is not a valid choice", "use one of auto, bernoulli"),
    ("--net", "rnn", "'rnn' is not a valid choice", "use one of mlp, conv"),
    ("--prior", "laplace", "'laplace' is not a valid choice", "use one of normal, uniform"),
    ("--activation", "swish", "'swish' is not a valid choice", "use one of relu"),
    ("--binarize", "sometimes", "'sometimes' is not a valid choice", "use one of dynamic"),
    ("--channels", "2", "2 is not a valid choice", "use one of 1, 3"),
    ("--device", "tpu", "'tpu' is not a device", "use auto, cpu, cuda"),
    ("--epochs", "-1", "--epochs must be at least 1, got -1", "at least 1"),
    ("--epochs", "0", "--epochs must be at least 1, got 0", "at least 1"),
    ("--latent-dim", "0", "--latent-dim must be at least 1, got 0", "at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1", "at least 1"),
    ("--lr", "0", "--lr must be greater than 0", "greater than 0"),
    ("--lr", "nan", "--lr must be a finite number", "finite number"),
    ("--beta", "-1", "--beta must be at least 0", "at least 0"),
    ("--test-fraction", "1.5", "--test-fraction must be at most 0.9", "at most 0.9"),
    ("--grad-clip", "0", "--grad-clip must be greater than 0", "greater than 0"),
    ("--gaussian-scale", "-1", "--gaussian-scale must be greater than 0", "greater than 0"),
    ("--keep-checkpoints", "0", "--keep-checkpoints must be at least 1", "at least 1"),
    ("--checkpoint-every-steps", "0", "--checkpoint-every-steps must be at least 1", "at least"),
    ("--time-limit", "-5", "--time-limit must be greater than 0", "greater than 0"),
    ("--hidden", "64,abc", "takes comma-separated integers", "such as 400,400"),
    ("--hidden", "0", "--hidden sizes must be positive integers", "for example --hidden"),
    ("--epochs", "abc", "--epochs takes an integer, got 'abc'", "see vaekit train --help"),
]:
    case(f"option{flag}={value}", problem, fix)(
        lambda f, r, flag=flag, value=value: train(flag, value))

case("option--background=grey", "--background 'grey' is not a colour",
     "use white, black, R,G,B")(lambda f, r: train("--background", "grey"))
case("option--background=300,0,0", "--background '300,0,0' is not a colour",
     "each of R, G, B from 0 to 255")(lambda f, r: train("--background", "300,0,0"))
case("evaluate-time-budget-zero", "--time-budget", "see vaekit evaluate --help")(
    lambda f, r: ["evaluate", copy_run(r, "mlp", f), "--time-budget", "0"])
case("unknown-option", "unrecognized arguments: --colour", "see vaekit --help")(
    lambda f, r: train("--colour", "blue"))
case("unknown-command", "invalid choice: 'trian'", "see vaekit --help")(lambda f, r: ["trian"])
case("evaluate-k-zero", "--k: expected a positive integer, got 0", "see vaekit evaluate --help")(
    lambda f, r: ["evaluate", copy_run(r, "mlp", f), "--k", "0"])
case("evaluate-limit-negative", "--limit: expected a positive integer, got -3",
     "see vaekit evaluate --help")(
    lambda f, r: ["evaluate", copy_run(r, "mlp", f), "--limit", "-3"])
case("sample-n-zero", "expected a positive integer, got 0", "see vaekit sample --help")(
    lambda f, r: ["sample", copy_run(r, "mlp", f), "-n", "0"])
case("reconstruct-unknown-split", "invalid choice: 'val'", "see vaekit reconstruct --help")(
    lambda f, r: ["reconstruct", copy_run(r, "mlp", f), "--split", "val"])
case("sample-out-not-png", "x.jpg: output", "must end in .png")(
    lambda f, r: ["sample", copy_run(r, "mlp", f), "--out", f / "x.jpg"])
case("sample-out-missing-folder", "no such folder", "create it or choose another output")(
    lambda f, r: ["sample", copy_run(r, "mlp", f), "--out", f / "a" / "b" / "x.png"])
case("features-not-dinov2", "--features inception:/x: expected dinov2:PATH",
     "a folder holding a DINOv2 checkpoint")(
    lambda f, r: ["evaluate", copy_run(r, "mlp", f), "--k", "5", "--sample-quality",
                  "--features", "inception:/x"])
case("features-without-sample-quality", "--features belongs to --sample-quality",
     "add --sample-quality or drop it")(
    lambda f, r: ["evaluate", copy_run(r, "mlp", f), "--features", f"dinov2:{f}"])
case("group-of-a-flat-run", "this run has one latent group", "vaekit train --latent-groups")(
    lambda f, r: ["traverse", copy_run(r, "mlp", f), "--group", "z1"])
case("conv-hierarchy-conditional", "--net conv --latent-groups is unconditional",
     "use --net mlp for a conditional hierarchy")(
    lambda f, r: train("--net", "conv", "--latent-groups", "2,3", "--conditional"))

# ------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict:
    """Every file's hash (the lock file by name only: it names the last process to take it)."""
    return {str(p.relative_to(folder)): "" if p.name == ".lock" else
            hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run) -> dict:
    """Finished runs to damage: the digits MLP run and one on real values (pipeline file)."""
    from vaekit.config import TrainConfig
    from vaekit.train import train as train_run

    folder = tmp_path_factory.mktemp("bad-input-runs")
    rng = np.random.default_rng(0)
    np.save(folder / "real.npy", rng.normal(size=(100, 4)).astype(np.float32))
    real = train_run(TrainConfig(data=str(folder / "real.npy"), epochs=1, batch_size=20,
                                 hidden=[8], latent_dim=2, progress=False,
                                 out=str(folder / "real")), log=lambda *a, **k: None)
    return {"mlp": tiny_run, "real": real}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, runs) -> dict:
    """Run every case (two at a time: each is a separate process) and record what happened."""
    root = tmp_path_factory.mktemp("bad-input")

    def run_case(name):
        folder = root / name.replace("/", "_")
        folder.mkdir()
        args = CASES[name][0](folder, runs)
        before = snapshot(folder)
        result = run_vaekit(*args, cwd=folder, timeout=300)
        return name, (args, result, before, snapshot(folder))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run_case, CASES))


def test_the_corpus_is_large():
    assert len(CASES) >= 30


def assert_refused(args, result, problem: str, fix: str) -> None:
    """Exit status 2 and one line on stderr naming the problem and the fix; no traceback."""
    stderr = result.stderr.strip()
    assert result.returncode == 2, f"{args}: exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(stderr.splitlines()) == 1, f"not one line:\n{stderr}"
    assert stderr.startswith("vaekit") and "error: " in stderr
    assert problem in stderr, f"problem {problem!r} not named in: {stderr}"
    assert fix in stderr, f"fix {fix!r} not given in: {stderr}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error_and_changes_nothing(outcomes, name):
    _, problem, fix = CASES[name]
    args, result, before, after = outcomes[name]
    assert_refused(args, result, problem, fix)
    assert after == before, "a file was created or changed"


# --- refusals that depend on the memory limit (set for the command alone) ------------------------


def test_a_run_over_the_memory_limit_is_refused_before_it_starts(tmp_path):
    """--likelihood categorical on colour images: 256 numbers a value. The estimate (weights,
    Adam, activations of one batch, data) is over a 64 MiB limit: one line naming the parts
    and the largest --batch-size that fits, exit 2, no run folder."""
    folder = tmp_path / "icons"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    result = run_vaekit(*train("--data", folder, "--net", "mlp", "--hidden", "8",
                               "--likelihood", "categorical", "--batch-size", "32"),
                        cwd=tmp_path, env={"VAEKIT_MEMORY_LIMIT": "64M"})
    assert_refused(["train"], result, "this run (--net mlp --likelihood categorical --batch-size "
                   "32 on 3x16x16 examples: weights and Adam", "use --batch-size")
    assert "activations of a batch of 32" in result.stderr
    assert not (tmp_path / "run").exists()
    # the batch it suggests fits: the same run at that batch starts (and trains one epoch)
    suggested = int(result.stderr.split("use --batch-size ")[1].split()[0])
    assert 1 <= suggested < 32
    again = run_vaekit(*train("--data", folder, "--net", "mlp", "--hidden", "8", "--likelihood",
                              "categorical", "--batch-size", str(suggested)),
                       cwd=tmp_path, env={"VAEKIT_MEMORY_LIMIT": "64M"})
    assert again.returncode == 0, again.stderr
