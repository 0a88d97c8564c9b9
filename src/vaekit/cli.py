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

    evaluate = commands.add_parser(
        "evaluate", help="estimate log p(x) of a run's data (importance sampling), with the ELBO, "
        "the naive estimator and more", description="Importance-sampled log p(x) with the "
        "encoder as proposal (the IWAE bound, Burda et al. 2016), the naive prior-sampling "
        "estimate at the same k, the ELBO and its two terms, the ELBO gap, bits per dimension, "
        "active units and the KL per latent dimension, each with its sample count and Monte "
        "Carlo standard error. Writes RUN_DIR/evaluation.json. Runs under torchrun too.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--split", choices=("test", "train"), default="test")
    evaluate.add_argument("--k", type=positive_int, default=5000, help="samples per example "
                          "for each estimator (default: 5000)")
    evaluate.add_argument("--limit", type=positive_int, metavar="N", help="only the first N "
                          "examples of the split")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the estimators' noise "
                          "(default: 0); the data's binarisation is the run's own")
    evaluate.add_argument("--json", action="store_true", help="print the evaluation.json "
                          "object alone on stdout")
    evaluate.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive "
                          "estimator (halves the time)")
    evaluate.add_argument("--batch-size", type=positive_int, metavar="N", help="examples per "
                          "chunk (default: as many as fit about 64 MiB of decoder outputs)")
    evaluate.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false",
                          help="no progress bar")

    explain = commands.add_parser(
        "explain", help="write an HTML report of the note's demonstrations on a run",
        description="Computes, on the run's own model and data: a shifted vs a damaged image "
        "(pixel distance vs log p(x)); naive vs importance-sampled log p(x) against k; the ELBO "
        "gap per example; the training curves of both ELBO terms; the gradient variance of the "
        "reparameterisation trick vs the score function. Writes RUN_DIR/explain.html (figures "
        "embedded, opens from disk) and RUN_DIR/explain-*.png.")
    explain.add_argument("run_dir", metavar="RUN_DIR")
    explain.add_argument("--examples", type=positive_int, default=100, help="test examples for "
                         "the estimator comparison and the ELBO gap (default: 100)")
    explain.add_argument("--k", type=positive_int, default=5000, help="largest number of "
                         "samples per example (default: 5000)")
    explain.add_argument("--gradient-repeats", type=positive_int, default=100,
                         help="independent gradient estimates per estimator and sample count "
                         "(default: 100)")
    explain.add_argument("--seed", type=int, default=0, help="seed of all the noise (default: 0)")
    explain.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
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

    from .viz import examples_image, save_png

    run = _load(args.run_dir, args.device)
    pipeline = run.pipeline
    out = Path(args.out) if args.out else run.path / f"samples-{args.n}-seed{args.seed}.png"
    _check_output(out, ".png")
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        samples = run.model.sample(args.n, mean=not args.draw)  # (n, *shape)
    shown = pipeline.display(samples)
    save_png(examples_image(shown), out)
    print(f"wrote {out} ({args.n} samples, {'drawn from' if args.draw else 'mean of'} p(x|z), "
          f"z ~ p(z) {run.config.prior})")
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
    out = Path(args.out) if args.out else run.path / f"reconstructions-{args.split}.png"
    _check_output(out, ".png")
    device = next(run.model.parameters()).device
    with torch.inference_mode():
        x = pipeline.fixed(raw.to(device), 0, args.split)
        reconstructions = run.model.reconstruct(x)
    save_png(reconstruction_image(pipeline.display(x), pipeline.display(reconstructions)), out)
    print(f"wrote {out} ({len(raw)} {args.split} examples above their reconstructions)")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from .distributed import DistContext
    from .errors import RunError
    from .estimate import evaluate_run
    from .report import evaluation_table
    from .runs import atomic_write_json, describe_os_error, load_run, load_run_dataset
    from .train import resolve_device

    device = resolve_device(args.device)
    dist = DistContext.from_env(device.type)
    try:
        device = resolve_device(args.device, dist)
        run = load_run(args.run_dir, device)
        dataset = load_run_dataset(run)
        total = len(dataset.test_x if args.split == "test" else dataset.train_x)
        total = min(total, args.limit or total)
        bar = _progress_bar(total, "log p(x)", args.progress and dist.is_main)
        try:
            result = evaluate_run(run, dataset, split=args.split, k=args.k, limit=args.limit,
                                  seed=args.seed, batch_size=args.batch_size, naive=args.naive,
                                  dist=dist, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        if not dist.is_main:
            return 0
        target = run.path / "evaluation.json"
        try:
            atomic_write_json(target, result)
        except OSError as exc:
            raise RunError(f"cannot write the evaluation: {describe_os_error(exc, target)}; make "
                           "the run folder writable") from None
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(evaluation_table(result))
            print(f"wrote {target}")
        return 0
    finally:
        dist.shutdown()


def cmd_explain(args) -> int:
    from .report import explain
    from .runs import load_run_dataset

    if args.k < 2 or args.examples < 2:
        raise VaekitError("--k and --examples must be at least 2 (an error bar needs two samples)")
    run = _load(args.run_dir, args.device)
    dataset = load_run_dataset(run)
    page = explain(run, dataset, seed=args.seed, examples=args.examples, k=args.k,
                   gradient_repeats=args.gradient_repeats,
                   log=lambda message: print(message, file=sys.stderr))
    print(f"wrote {page} (open it in a browser; figures also saved as "
          f"{run.path / 'explain-*.png'})")
    return 0


def _progress_bar(total: int, what: str, enabled: bool):
    """A tqdm bar on stderr counting examples, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="example", leave=False, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def _check_output(path: Path, suffix: str) -> None:
    if path.suffix.lower() != suffix:
        raise VaekitError(f"{path}: output must end in {suffix}")
    if not path.parent.exists():
        raise VaekitError(f"{path.parent}: no such folder; create it or choose another output")
    if path.is_dir():
        raise VaekitError(f"{path} is a folder; give a file name ending in {suffix}")


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "reconstruct": cmd_reconstruct,
            "evaluate": cmd_evaluate, "explain": cmd_explain}


if __name__ == "__main__":
    raise SystemExit(main())
