"""Hostile inputs through the real `vaekit` command: planted links and special files, read-only
and full disks, absurd sizes, untrusted JSON, hostile data files, non-finite weights.

Like the bad-input corpus (test_cli_bad_input.py), every case must give exit status 2, one line
on stderr naming the problem and the fix, no traceback, and leave every file of its folder as it
was; the folder holds whatever lies "outside" the run too (a link's target, another run), so
nothing outside is touched either. Disks: a read-only folder is a read-only bind mount (root) or
a folder without write permission; a full disk is a tmpfs filled to the last byte (root), or,
where nothing can be mounted, a process whose fsync reports ENOSPC (as a full disk does for
delayed allocation); the file size limit (RLIMIT_FSIZE) gives EFBIG anywhere.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import write_fake_mnist
from test_cli_bad_input import case as register_case
from test_cli_bad_input import assert_refused, runs, snapshot  # noqa: F401 (runs: a fixture)

ROOT = os.geteuid() == 0


@dataclass
class Call:
    """How one case runs: the arguments, and what its process or folder must be given."""

    args: list
    env: dict = field(default_factory=dict)
    file_size_limit: int | None = None  # RLIMIT_FSIZE, bytes
    cleanup: list = field(default_factory=list)  # callables run after the command
    skip: str | None = None  # why this machine cannot set the case up


CASES: dict[str, tuple] = {}  # id -> (setup(folder, trained runs) -> Call, problem, fix)


def case(name: str, problem: str, fix: str):
    return register_case(name, problem, fix, registry=CASES)


def copy_run(trained: dict, folder: Path, key: str = "mlp", name: str = "run") -> Path:
    return Path(shutil.copytree(trained[key], folder / name))


def precious(folder: Path) -> Path:
    """A file outside the run that no case may change."""
    (folder / "outside").mkdir(exist_ok=True)
    path = folder / "outside" / "precious.txt"
    path.write_text("the user's own file\n")
    return path


def newest_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def rehash(checkpoint: Path) -> None:
    """Make a checkpoint's manifest match its (edited) files again."""
    import hashlib

    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


def edit_config(run: Path, change) -> None:
    document = json.loads((run / "config.json").read_text())
    change(document)
    (run / "config.json").write_text(json.dumps(document))


def resume(run: Path) -> list:
    return ["train", "--resume", run, "--epochs", "5", "--no-progress"]


# --- class 2: links and special files where vaekit writes or deletes ---------------------------


@case("lock-link-on-resume", "is a symbolic link", "remove the link")
def _(folder, trained):
    run = copy_run(trained, folder)
    (run / ".lock").unlink(missing_ok=True)
    os.symlink(precious(folder), run / ".lock")
    return Call(resume(run))


@case("lock-link-in-fresh-out", "is a symbolic link", "remove the link")
def _(folder, trained):
    (folder / "run").mkdir()
    os.symlink(precious(folder), folder / "run" / ".lock")
    return Call(["train", "--no-progress", "--epochs", "1", "--out", folder / "run"])


@case("lock-dangling-link", "is a symbolic link", "remove the link")
def _(folder, trained):
    run = copy_run(trained, folder)
    (run / ".lock").unlink(missing_ok=True)
    os.symlink(folder / "outside-file-to-be", run / ".lock")
    return Call(resume(run))


@case("lock-is-a-fifo", "FIFO", "remove it")
def _(folder, trained):
    run = copy_run(trained, folder)
    (run / ".lock").unlink(missing_ok=True)
    os.mkfifo(run / ".lock")
    return Call(resume(run))


@case("checkpoints-link-to-another-run", "is a symbolic link", "remove the link")
def _(folder, trained):
    other = copy_run(trained, folder, name="other")
    run = copy_run(trained, folder)
    shutil.rmtree(run / "checkpoints")
    os.symlink(other / "checkpoints", run / "checkpoints")
    return Call(resume(run))


@case("checkpoints-is-a-file", "where vaekit keeps a folder", "move it away")
def _(folder, trained):
    run = copy_run(trained, folder)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    return Call(resume(run))


@case("checkpoint-step-link-to-another-run", "is a symbolic link", "remove the link")
def _(folder, trained):
    other = copy_run(trained, folder, name="other")
    run = copy_run(trained, folder)
    os.symlink(newest_checkpoint(other), run / "checkpoints" / "step-000099999")
    return Call(resume(run))


def damage_every_checkpoint(run: Path, damage) -> None:
    for checkpoint in (run / "checkpoints").glob("step-*"):
        damage(checkpoint)


@case("manifest-names-a-file-outside", "no complete checkpoint", "start a new run")
def _(folder, trained):
    run = copy_run(trained, folder)
    target = precious(folder)

    def damage(checkpoint):
        manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
        manifest["files"]["../../../outside/precious.txt"] = {"sha256": "0" * 64, "bytes": 20}
        (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))
    damage_every_checkpoint(run, damage)
    assert target.exists()
    return Call(resume(run))


for listed in ("optimizer.safetensors",):
    def fifo_in_manifest(folder, trained, listed=listed):
        run = copy_run(trained, folder)
        damage_every_checkpoint(run, lambda c: ((c / listed).unlink(), os.mkfifo(c / listed)))
        return Call(resume(run))
    case(f"manifest-lists-a-fifo-{listed}", "no complete checkpoint", "start a new run")(
        fifo_in_manifest)


@case("manifest-is-a-fifo", "no complete checkpoint", "start a new run")
def _(folder, trained):
    run = copy_run(trained, folder)
    damage_every_checkpoint(run, lambda c: ((c / "MANIFEST.json").unlink(),
                                            os.mkfifo(c / "MANIFEST.json")))
    return Call(resume(run))


for name, problem, fix in [("config.json", "no config.json", "give the folder"),
                           ("model.safetensors", "model.safetensors is missing",
                            "resume with vaekit train")]:
    def run_file_is_a_fifo(folder, trained, name=name):
        run = copy_run(trained, folder)
        (run / name).unlink()
        os.mkfifo(run / name)
        return Call(["sample", run, "-n", "4"])
    case(f"{name}-is-a-fifo", problem, fix)(run_file_is_a_fifo)


# --- class 3: read-only and full disks, for every command that writes -------------------------

WRITERS = {
    "sample": ["-n", "16"], "reconstruct": ["-n", "8"], "interpolate": [], "traverse": [],
    "manifold": ["--grid", "5"], "embed": [],
}


def _mount(*args) -> bool:
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def _umount(path: Path):
    return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)


def read_only_run(folder: Path, trained: dict) -> tuple[Path, list]:
    run = copy_run(trained, folder)
    if not ROOT:
        for path in [run, *run.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)

        def restore():
            for path in [run, *run.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o755)
        return run, [restore]
    if _mount("--bind", run, run) and _mount("-o", "remount,bind,ro", run):
        return run, [_umount(run)]
    return run, None


def full_disk_run(folder: Path, trained: dict) -> tuple[Path, dict, list]:
    """The run on a disk with no byte left (tmpfs), else a process whose fsync says ENOSPC."""
    disk = folder / "disk"
    disk.mkdir()
    size = sum(p.stat().st_size for p in Path(trained["mlp"]).rglob("*") if p.is_file())
    if ROOT and _mount("-t", "tmpfs", "-o", f"size={2 * size + 2**20}", "tmpfs", disk):
        try:
            run = copy_run(trained, disk)
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
        except BaseException:
            _umount(disk)()
            raise
        return run, {}, [_umount(disk)]
    run = copy_run(trained, disk)
    hook = folder / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import errno, os
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync = fsync
    """))
    return run, {"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}, []


for command, options in WRITERS.items():
    def on_read_only(folder, trained, command=command, options=options):
        run, cleanup = read_only_run(folder, trained)
        if cleanup is None:
            return Call([], skip="no read-only mount or permission available")
        return Call([command, run, *options], cleanup=cleanup)

    def on_full_disk(folder, trained, command=command, options=options):
        run, env, cleanup = full_disk_run(folder, trained)
        return Call([command, run, *options], env=env, cleanup=cleanup)

    def over_file_size_limit(folder, trained, command=command, options=options):
        return Call([command, copy_run(trained, folder), *options], file_size_limit=400)

    case(f"{command}-read-only", "is not writable", "choose a writable --out")(on_read_only)
    case(f"{command}-full-disk", "is full", "free some space")(on_full_disk)
    if command in ("sample", "embed"):  # one image, and an image then an array
        case(f"{command}-file-size-limit", "file size limit", "free some space")(
            over_file_size_limit)


# --- class 4: sizes a user controls, from options and from config.json ------------------------


def train(*args) -> Call:
    return Call(["train", "--no-progress", "--epochs", "1", "--out", "run", *args])


for options, problem in [
    (("--latent-dim", str(10**12)), "--latent-dim 1000000000000"),
    (("--hidden", str(10**8)), "--hidden 100000000"),
    (("--hidden", f"64,{10**8},64"), "parameters"),
    (("--prior", "mixture", "--prior-components", str(10**9)), "parameters"),
    (("--prior", "vamp", "--prior-components", str(10**9)), "parameters"),
    (("--likelihood", "logistic-mixture", "--likelihood-components", str(10**9)), "parameters"),
    (("--net", "conv", "--conv-channels", str(10**6)), "parameters"),
    (("--num-samples", str(10**8)), "--num-samples 100000000"),
    (("--objective", "iwae", "--iwae-samples", str(10**9)), "--iwae-samples 1000000000"),
    (("--epochs", str(10**13)), "a step log"),
    (("--latent-groups", f"16,{10**12}"), "--latent-groups 16,1000000000000"),
    (("--posterior", "full-covariance", "--latent-dim", str(10**6)), "parameters"),
    (("--posterior", "iaf", "--latent-dim", str(10**7)), "parameters"),
]:
    case(f"train{'='.join(options)}", problem, "memory limit")(
        lambda f, r, options=options: train(*options))

for flag, value in [("--seed", 2**70), ("--seed", -(2**64)), ("--split-seed", 2**63)]:
    case(f"train{flag}={value}", f"{flag} must be a whole number from -2**63 to 2**63 - 1",
         "choose a smaller seed")(lambda f, r, flag=flag, value=value: train(flag, str(value)))

for command, options, problem in [
    ("sample", ["-n", str(10**8)], "-n 100000000"),
    ("sample", ["--seed", str(2**70)], "expected a seed from -2**63 to 2**63 - 1"),
    ("interpolate", ["--steps", str(10**8)], "--steps 100000000"),
    ("interpolate", ["--random", "--seed", str(2**64)], "expected a seed from -2**63 to 2**63 - 1"),
    ("traverse", ["--steps", str(10**7)], "--steps 10000000"),
    ("manifold", ["--grid", str(10**5)], "--grid 100000"),
    ("explain", ["--k", str(10**9)], "--k 1000000000"),
    ("evaluate", ["--seed", str(2**63)], "expected a seed from -2**63 to 2**63 - 1"),
]:
    fix = "see vaekit" if "seed" in problem else "memory limit"
    case(f"{command}{'='.join(options)}", problem, fix)(
        lambda f, r, command=command, options=options: Call([command, copy_run(r, f),
                                                             *options]))


for key, value, problem in [
    ("hidden", [10_000_000], "has shape"),
    ("latent_dim", 10**12, "has shape"),
    ("seed", 2**70, "must be a whole number from -2**63 to 2**63 - 1"),
]:
    def config_value(folder, trained, key=key, value=value):
        run = copy_run(trained, folder)
        edit_config(run, lambda d: d["config"].__setitem__(key, value))
        return Call(["sample", run, "-n", "4"])
    case(f"config-json-{key}={value}", problem, "config.json")(config_value)


@case("image-size-huge", "--image-size 100000", "choose a smaller --image-size")
def _(folder, trained):
    from PIL import Image

    (folder / "images").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), i * 40).save(folder / "images" / f"{i}.png")
    return train("--data", folder / "images", "--image-size", "100000")


# --- class 5 (generic): untrusted JSON ----------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


for name, text, problem in [
    ("nested", nested(100_000), "nested 100000 deep"),
    ("nested-in-a-value", None, "nested"),
    ("nan-token", None, "NaN is not a JSON number"),
    ("infinity-token", None, "Infinity is not a JSON number"),
    ("huge-integer", None, "not valid JSON"),
    ("not-utf8", None, "not UTF-8"),
    ("over-16-mib", None, "over the limit"),
]:
    def bad_config(folder, trained, name=name, text=text):
        run = copy_run(trained, folder)
        path = run / "config.json"
        original = path.read_text()
        if name == "nested-in-a-value":
            text = original.replace('"fingerprint"', f'"junk": {nested(50_000)}, "fingerprint"')
        elif name == "nan-token":
            text = original.replace('"beta": 1.0', '"beta": NaN')
        elif name == "infinity-token":
            text = original.replace('"beta": 1.0', '"beta": -Infinity')
        elif name == "huge-integer":
            text = original.replace('"seed": 0', '"seed": ' + "9" * 5000)
        elif name == "over-16-mib":
            text = original + " " * (17 * 2**20)
        if name == "not-utf8":
            path.write_bytes(original.encode().replace(b"digits", b"dig\xffits", 1))
        else:
            assert text != original
            path.write_text(text)
        return Call(["sample", run, "-n", "4"])
    case(f"config-json-{name}", problem, "restore the run's original config.json")(bad_config)


@case("manifest-json-nested", "no complete checkpoint", "start a new run")
def _(folder, trained):
    run = copy_run(trained, folder)
    damage_every_checkpoint(run, lambda c: (c / "MANIFEST.json").write_text(nested(100_000)))
    return Call(resume(run))


@case("state-json-nested", "training state is unreadable", "resume from an earlier checkpoint")
def _(folder, trained):
    run = copy_run(trained, folder)
    checkpoint = newest_checkpoint(run)
    (checkpoint / "state.json").write_text(nested(100_000))
    rehash(checkpoint)
    return Call(resume(run))


@case("state-json-nan-token", "training state is unreadable", "resume from an earlier checkpoint")
def _(folder, trained):
    run = copy_run(trained, folder)
    checkpoint = newest_checkpoint(run)
    text = (checkpoint / "state.json").read_text()
    (checkpoint / "state.json").write_text(text.replace('"train_seconds": ', '"train_seconds": '
                                                        'NaN, "x": ', 1))
    rehash(checkpoint)
    return Call(resume(run))


# --- class 6: hostile data files ----------------------------------------------------------------


@case("csv-field-over-the-csv-limit", "field larger than field limit", "each value a short number")
def _(folder, trained):
    (folder / "data.csv").write_text("a,b\n1," + "1" * 200_000 + "\n2,3\n")
    return train("--data", folder / "data.csv")


@case("csv-nul-byte", "not a number", "CSV features must be numeric")
def _(folder, trained):
    (folder / "data.csv").write_bytes(b"a,b\n1,2\n3,\x004\n5,6\n")
    return train("--data", folder / "data.csv")


@case("csv-labels-too-many-classes", "distinct values is 10,001", "use at most 10,000")
def _(folder, trained):
    rows = "".join(f"{i * 7 + 10**9},{i % 3}\n" for i in range(10_001))
    (folder / "data.csv").write_text("label,x\n" + rows)
    return train("--data", folder / "data.csv", "--conditional")


@case("csv-label-beyond-exact-integers", "must hold class numbers", "non-negative integers")
def _(folder, trained):
    (folder / "data.csv").write_text("label,x\n1e300,1\n0,2\n1,3\n0,4\n")
    return train("--data", folder / "data.csv")


def special_file(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()  # the socket file stays
    else:  # a link to a character device
        os.symlink("/dev/zero", path)
    return path


for suffix, kind, words in [(".npy", "fifo", "FIFO"), (".npz", "fifo", "FIFO"),
                           (".csv", "fifo", "FIFO"), (".csv", "socket", "socket"),
                           (".npy", "device", "character device")]:
    case(f"data{suffix}-is-a-{kind}", words, "regular file")(
        lambda f, r, suffix=suffix, kind=kind: train(
            "--data", special_file(f / f"data{suffix}", kind)))


@case("image-folder-holds-a-fifo", "FIFO", "regular file")
def _(folder, trained):
    from PIL import Image

    (folder / "images").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i * 40).save(folder / "images" / f"{i}.png")
    os.mkfifo(folder / "images" / "3.png")
    return train("--data", folder / "images")


@case("config-json-names-a-fifo-as-data", "FIFO", "regular file")
def _(folder, trained):
    run = copy_run(trained, folder)
    os.mkfifo(folder / "data.npy")
    edit_config(run, lambda d: d["config"].__setitem__("data", str(folder / "data.npy")))
    return Call(["reconstruct", run])


@case("npy-header-promises-a-huge-array", "of shape (1000000000000, 4)", "save a smaller array")
def _(folder, trained):
    np.save(folder / "data.npy", np.zeros((3, 4), np.float32))
    raw = (folder / "data.npy").read_bytes()
    (folder / "data.npy").write_bytes(raw.replace(b"(3, 4)", b"(1000000000000, 4)", 1))
    return train("--data", folder / "data.npy")


@case("npz-inflates-over-the-limit", "inflated", "save smaller arrays")
def _(folder, trained):
    np.savez_compressed(folder / "data.npz", x=np.zeros((2**21, 2), np.uint8))  # 4 MiB
    return Call(train("--data", folder / "data.npz").args, env={"VAEKIT_MEMORY_LIMIT": "1M"})


@case("idx-gzip-inflates-over-the-limit", "an IDX file of", "original MNIST-format file")
def _(folder, trained):
    data = write_fake_mnist(folder / "mnist", n_train=4000, n_test=10, gz=True)
    return Call(train("--data", "mnist", "--data-dir", data).args,
                env={"VAEKIT_MEMORY_LIMIT": "1M"})


@case("idx-header-promises-more-than-memory", "an IDX file of", "original MNIST-format file")
def _(folder, trained):
    data = write_fake_mnist(folder / "mnist", n_train=20, n_test=10, gz=True)
    path = data / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[4:8] = (2**31).to_bytes(4, "big")  # 2**31 images of 28 x 28
    path.write_bytes(gzip.compress(bytes(raw)))
    return train("--data", "mnist", "--data-dir", data)


@case("npz-member-header-promises-more-than-memory", "x of shape (1000000, 1000000)",
      "save a smaller array")
def _(folder, trained):
    """A zip member honest about its few inflated bytes, whose .npy header declares 7 TiB."""
    import io
    import zipfile

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                        "shape": (10**6, 10**6)})
    with zipfile.ZipFile(folder / "data.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))
    return train("--data", folder / "data.npz")


@case("image-over-the-memory-limit", "1,000 x 1,000 pixels", "shrink or remove the image")
def _(folder, trained):
    """A small PNG whose header declares more pixels than the memory limit: refused from the
    header, before it is decoded (a folder of many images is decoded one image at a time)."""
    from PIL import Image

    (folder / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / "images" / f"{i}.png")
    Image.new("RGB", (1000, 1000)).save(folder / "images" / "3.png")
    return Call(train("--data", folder / "images", "--image-size", "8").args,
                env={"VAEKIT_MEMORY_LIMIT": "1M"})


# --- class 8: non-finite weights ----------------------------------------------------------------


def poison(path: Path, value: float) -> None:
    tensors = load_file(path)
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, path)


for command, value in [("sample", float("nan")), ("evaluate", float("inf"))]:
    def poisoned_weights(folder, trained, command=command, value=value):
        run = copy_run(trained, folder)
        poison(run / "model.safetensors", value)
        extra = ["--k", "2", "--limit", "4"] if command == "evaluate" else []
        return Call([command, run, *extra])
    case(f"{command}-weights-{value}", "holds NaN or infinite values", "retrain")(
        poisoned_weights)


@case("resume-checkpoint-weights-nan", "holds NaN or infinite values", "retrain")
def _(folder, trained):
    run = copy_run(trained, folder)
    checkpoint = newest_checkpoint(run)
    poison(checkpoint / "model.safetensors", float("nan"))
    rehash(checkpoint)
    return Call(resume(run))


@case("pipeline-statistics-nan", "holds NaN, infinite or non-positive values", "retrain")
def _(folder, trained):
    run = copy_run(trained, folder, key="real")
    poison(run / "pipeline.safetensors", float("nan"))
    return Call(["sample", run, "-n", "4"])


# ------------------------------------------------------------------------------------------------


def run_call(call: Call, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **call.env}
    limit = call.file_size_limit

    def limits():  # in the child, before exec: only this command gets the file size limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "vaekit", *map(str, call.args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=limits if limit else None)


def special_files(folder: Path) -> dict:
    """FIFOs, sockets and links of a folder, by kind and target: none may be replaced."""
    found = {}
    for path in sorted(folder.rglob("*")):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            found[str(path.relative_to(folder))] = "link " + os.readlink(path)
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            found[str(path.relative_to(folder))] = stat.S_IFMT(mode)
    return found


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, runs) -> dict:  # noqa: F811 (the imported fixture)
    root = tmp_path_factory.mktemp("hostile")

    def run_case(name):
        folder = root / name.replace("/", "_")
        folder.mkdir()
        try:
            call = CASES[name][0](folder, runs)
        except Exception as exc:  # noqa: BLE001 (reported by this case's test, not all of them)
            return name, exc
        if call.skip:
            return name, call
        before = (snapshot(folder), special_files(folder))
        started = time.monotonic()
        try:
            result = run_call(call, folder)
            after = (snapshot(folder), special_files(folder))
        finally:
            for undo in call.cleanup:
                undo()
        return name, (call, result, before, after, time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run_case, CASES))


def test_the_hostile_corpus_is_large():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_gives_one_line_error_and_touches_nothing(outcomes, name):
    _, problem, fix = CASES[name]
    if isinstance(outcomes[name], Exception):
        raise outcomes[name]
    if isinstance(outcomes[name], Call):
        pytest.skip(outcomes[name].skip)
    call, result, before, after, _ = outcomes[name]
    assert_refused(call.args, result, problem, fix)
    assert after == before, "a file was created, changed or replaced"


def test_report_the_slowest_cases(outcomes, capsys):
    """Not a timing assertion: prints where the corpus spends its time (pytest -s shows it)."""
    timed = sorted(((v[-1], k) for k, v in outcomes.items() if isinstance(v, tuple)),
                   reverse=True)
    with capsys.disabled():
        print("\nslowest hostile cases:", ", ".join(f"{k} {t:.1f}s" for t, k in timed[:8]))
    assert timed
