"""The `vaekit` command: parse, call the library, print. Torch is imported only by the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import TrainConfig, add_config_arguments, config_overrides
from .errors import VaekitError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> Parser:
    parser = Parser(prog="vaekit", description="Train a variational autoencoder, generate from "
                    "it, steer its latent space and measure its log-likelihood.",
                    epilog="Start with: vaekit train  (trains on the built-in digits in about a "
                    "minute), then vaekit sample RUN_DIR.")
    parser.add_argument("--version", action="version", version=f"vaekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    train = commands.add_parser("train", help="train a VAE (default: on the built-in digits)",
                                description="Train a VAE by maximising the ELBO. Every option "
                                "below is also a key of the run's config.json.")
    add_config_arguments(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last "
                       "complete checkpoint (only --epochs, --time-limit, --device and checkpoint "
                       "options may change)")
    train.add_argument("--inexact-resume", action="store_true", help="resume even if the saved "
                       "random state is missing or inconsistent (recorded in the run)")

    sample = commands.add_parser("sample", help="draw new examples from a trained run's prior",
                                 description="z ~ p(z), then x from p(x|z): new data, the point "
                                 "of a VAE.")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("-n", type=positive_int, default=64, help="how many (default: 64)")
    sample.add_argument("--out", metavar="FILE.png", help="image to write (default: "
                        "RUN_DIR/samples-N-seedS.png)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    sample.add_argument("--draw", action="store_true", help="show x drawn from p(x|z) instead "
                        "of its mean E[x|z]")
    sample.add_argument("--label", metavar="CLASS", help="conditional runs: draw this class (its "
                        "name, e.g. Sandal, or its index); default: a grid with one row per class")
    sample.add_argument("--per-class", type=positive_int, default=8, metavar="N",
                        help="conditional runs without --label: samples in each class's row "
                        "(default: 8)")
    sample.add_argument("--save-array", metavar="FILE.npy", help="also save the samples as a "
                        "numeric array (data units)")
    sample.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    recon = commands.add_parser("reconstruct", help="encode and decode test examples",
                                description="x -> q(z|x) -> E[x|z] at the posterior mean: inputs "
                                "above their reconstructions.")
    recon.add_argument("run_dir", metavar="RUN_DIR")
    recon.add_argument("-n", type=positive_int, default=32, help="how many (default: 32)")
    recon.add_argument("--split", choices=("test", "train"), default="test")
    recon.add_argument("--out", metavar="FILE.png", help="image to write (default: "
                       "RUN_DIR/reconstructions-SPLIT.png)")
    recon.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except VaekitError as exc:
        print(f"vaekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vaekit {args.command}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_train(args) -> int:
    from .train import Interrupted, train

    overrides = config_overrides(args, TrainConfig)
    try:
        train(TrainConfig() if args.resume is None else None, resume=args.resume,
              overrides=overrides, inexact_resume=args.inexact_resume)
    except Interrupted as exc:
        print(f"vaekit train: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _load(run_dir: str, device: str):
    from .train import resolve_device
    from .runs import load_run

    return load_run(run_dir, resolve_device(device))


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .viz import class_rows_image, examples_image, save_png

    run = _load(args.run_dir, args.device)
    pipeline, names = run.pipeline, run.label_names
    if args.label is not None and names is None:
        raise VaekitError(f"{run.path} is not a conditional run, so --label has no meaning; "
                          "drop it, or train with --conditional")
    label = None if args.label is None else resolve_label(args.label, names)
    grid = names is not None and label is None  # one row per class
    count = len(names) * args.per_class if grid else args.n
    tag = f"-label{label}" if label is not None else "-classes" if grid else ""
    out = Path(args.out) if args.out else run.path / f"samples-{count}{tag}-seed{args.seed}.png"
    _check_output(out, ".png")
    device = next(run.model.parameters()).device
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if grid:
            y = torch.arange(len(names), device=device).repeat_interleave(args.per_class)
        else:
            y = None if label is None else torch.full((count,), label, device=device)
        samples = run.model.sample(count, y, mean=not args.draw)  # (count, *shape)
    shown = pipeline.display(samples)
    save_png(class_rows_image(shown, names) if grid else examples_image(shown), out)
    given = f", y = {names[label]} (class {label})" if label is not None else \
        f", one row per class ({len(names)} classes)" if grid else ""
    print(f"wrote {out} ({count} samples, {'drawn from' if args.draw else 'mean of'} p(x|z), "
          f"z ~ p(z) {run.config.prior}{given})")
    if args.save_array:
        target = Path(args.save_array)
        _check_output(target, ".npy")
        np.save(target, shown.cpu().numpy())
        print(f"wrote {target} {tuple(shown.shape)}")
    return 0


def cmd_reconstruct(args) -> int:
    import torch

    from .runs import load_run_dataset
    from .viz import reconstruction_image, save_png

    run = _load(args.run_dir, args.device)
    dataset, pipeline = load_run_dataset(run), run.pipeline
    raw = (dataset.test_x if args.split == "test" else dataset.train_x)[:args.n]
    labels = (dataset.test_y if args.split == "test" else dataset.train_y)[:args.n] \
        if run.config.conditional else None
    out = Path(args.out) if args.out else run.path / f"reconstructions-{args.split}.png"
    _check_output(out, ".png")
    device = next(run.model.parameters()).device
    with torch.inference_mode():
        x = pipeline.fixed(raw.to(device), 0, args.split)
        y = None if labels is None else labels.to(device)
        reconstructions = run.model.reconstruct(x, y)
    save_png(reconstruction_image(pipeline.display(x), pipeline.display(reconstructions)), out)
    print(f"wrote {out} ({len(raw)} {args.split} examples above their reconstructions)")
    return 0


def resolve_label(text: str, names: list[str]) -> int:
    """A class given by name (first) or by index -> its index."""
    if text in names:
        return names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
        return int(text)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise VaekitError(f"--label {text!r} is not a class of this run: give a name ({shown}) or an "
                      f"index 0..{len(names) - 1}")


def _check_output(path: Path, suffix: str) -> None:
    if path.suffix.lower() != suffix:
        raise VaekitError(f"{path}: output must end in {suffix}")
    if not path.parent.exists():
        raise VaekitError(f"{path.parent}: no such folder; create it or choose another output")
    if path.is_dir():
        raise VaekitError(f"{path} is a folder; give a file name ending in {suffix}")


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "reconstruct": cmd_reconstruct}


if __name__ == "__main__":
    raise SystemExit(main())
