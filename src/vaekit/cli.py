"""The `vaekit` command: parse, call the library, print. Torch is imported only by the commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .config import RESUMABLE_OVERRIDES, TrainConfig, add_config_arguments, config_overrides
from .errors import VaekitError, record_for_launcher


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2, no silently accepted
    prefixes of options (--epoch is not --epochs: a typo must not train with a surprise), and a
    suggestion for a misspelt option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see "
                  f"{self.prog} --help)\n")

    def _suggestion(self, message: str) -> str:
        import difflib

        if not message.startswith("unrecognized arguments: "):
            return ""
        known = self._long_options()
        for word in message.removeprefix("unrecognized arguments: ").split():
            if word.startswith("--"):
                # compared without the dashes, which every option shares
                names = {option[2:]: option for option in known}
                close = difflib.get_close_matches(word.partition("=")[0][2:], names, n=1,
                                                  cutoff=0.7)
                if close and names[close[0]] == word.partition("=")[0]:
                    return f"; {names[close[0]]} is an option of another vaekit command"
                if close:
                    return f"; did you mean {names[close[0]]}?"
        return ""

    def _long_options(self) -> list[str]:
        """The --options of this parser and its commands' (argparse reports unknown options of
        a command from the top parser)."""
        found = []
        for action in self._actions:
            found += [option for option in action.option_strings if option.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                for command in action.choices.values():
                    found += command._long_options()
        return found


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def index_or_centre(text: str) -> int | None:
    """--base: 'centre' (the prior's) or the number of a test example."""
    if text.strip().lower() in ("centre", "center"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'centre' or a test example number, got "
                                         f"{text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"test examples are numbered from 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def port_number(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"ports go from 0 to 65535, got {value}")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,3,5, got "
                                         f"{text!r}") from None


def seed_number(text: str) -> int:
    """A seed: -2**63 .. 2**63 - 1 (the range torch's generators take)."""
    from .budget import check_seed

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    try:
        return check_seed("the seed", value)
    except VaekitError:
        raise argparse.ArgumentTypeError(f"expected a seed from -2**63 to 2**63 - 1, got "
                                         f"{value}") from None


def positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def temperature_list(text: str) -> list[float]:
    """--temperatures: comma-separated numbers in [0, 10], such as 1.0,0.8."""
    import math

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1.0,0.8, got "
                                         f"{text!r}") from None
    if not values or any(not (math.isfinite(v) and 0 <= v <= 10) for v in values):
        raise argparse.ArgumentTypeError(f"temperatures are numbers from 0 to 10 (1 is the prior "
                                         f"itself), got {text!r}")
    return values


GROUP_HELP = ("a hierarchical run's latent group to steer (z1 the top group, the default; a "
              "lower group is shown in its prior's coordinates, the groups above at --base's "
              "posterior means or at their prior means)")


def build_parser() -> Parser:
    parser = Parser(prog="vaekit", description="Train a variational autoencoder, generate from "
                    "it, steer its latent space and measure its log-likelihood.",
                    epilog="Start with: vaekit train  (trains on the built-in digits in about "
                    "15 seconds on 2 CPU cores), then vaekit sample RUN_DIR.")
    parser.add_argument("--version", action="version", version=f"vaekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    train = commands.add_parser("train", help="train a VAE (default: on the built-in digits)",
                                description="Train a VAE by maximising the ELBO. Every option "
                                "below is also a key of the run's config.json.")
    add_config_arguments(train)
    train.add_argument("--config", metavar="FILE", help="a JSON file of training options (keys "
                       "as in config.json, such as the recipes in recipes/); options given on "
                       "the command line override it")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last "
                       "complete checkpoint (only "
                       f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_OVERRIDES)} "
                       "may change)")
    train.add_argument("--inexact-resume", action="store_true", help="resume even if the saved "
                       "random state is missing or inconsistent (recorded in the run)")
    train.add_argument("--nproc", type=positive_int, metavar="N", help="train with N processes "
                       "on this machine (one per GPU, or N CPU processes), launched through "
                       "torch.distributed.run (torchrun); --batch-size stays the global batch. "
                       "Several machines: run torchrun yourself (see the README)")

    sample = commands.add_parser("sample", help="draw new examples from a trained run's prior",
                                 description="z ~ p(z), then x from p(x|z): new data, the point "
                                 "of a VAE.")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("-n", type=positive_int, default=64, help="how many (default: 64)")
    sample.add_argument("--out", metavar="FILE.png", help="image to write (default: "
                        "RUN_DIR/samples-N-seedS.png)")
    sample.add_argument("--seed", type=seed_number, default=0, help="seed of the draws (default: 0)")
    sample.add_argument("--draw", action="store_true", help="show x drawn from p(x|z) instead "
                        "of its mean E[x|z]")
    sample.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="scale of the prior's noise, 0 to 10 (default: 1, the prior; "
                        "below 1 fewer but more typical samples; see the README)")
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

    evaluate = commands.add_parser(
        "evaluate", help="estimate log p(x) of a run's data (importance sampling), with the ELBO, "
        "the naive estimator and more", description="Importance-sampled log p(x) with the "
        "encoder as proposal (the IWAE bound, Burda et al. 2016), the naive prior-sampling "
        "estimate at the same k, the ELBO and its two terms, the ELBO gap, bits per dimension, "
        "active units and the KL per latent dimension, each with its sample count and Monte "
        "Carlo standard error. Writes RUN_DIR/evaluation.json. Runs under torchrun too.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--split", choices=("test", "train"), default="test")
    evaluate.add_argument("--k", type=positive_int, help="samples per example for each "
                          "estimator (default: the largest of 5000, 2000, 1000, 500, 200, 100 "
                          "that the model's measured cost fits in --time-budget; --k 5000 for "
                          "published figures)")
    evaluate.add_argument("--time-budget", type=positive_float, default=120.0,
                          metavar="SECONDS", help="without --k: the time k is chosen for "
                          "(default: 120)")
    evaluate.add_argument("--limit", type=positive_int, metavar="N", help="a seeded random "
                          "subset of N examples of the split (--seed; recorded in "
                          "evaluation.json)")
    evaluate.add_argument("--seed", type=seed_number, default=0, help="seed of the estimators' noise "
                          "(default: 0); the data's binarisation is the run's own")
    evaluate.add_argument("--json", action="store_true", help="print the evaluation.json "
                          "object alone on stdout")
    evaluate.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive "
                          "estimator (halves the time)")
    evaluate.add_argument("--batch-size", type=positive_int, metavar="N", help="examples per "
                          "chunk (default: enough for cache-sized decoder passes of 16 samples "
                          "each, within about 64 MiB)")
    evaluate.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false",
                          help="no progress bar")
    evaluate.add_argument("--sample-quality", action="store_true", help="also score the run's "
                          "samples against real training examples: Frechet distance, KID, "
                          "precision, recall, density and coverage in features of a network "
                          "vaekit trains on the run's data (cached), with bootstrap intervals and "
                          "the floor of real test examples")
    evaluate.add_argument("--samples", type=positive_int, metavar="N", help="with "
                          "--sample-quality: samples per score (default: the test set's size, at "
                          "most 10,000)")
    evaluate.add_argument("--temperatures", type=temperature_list, default=[1.0],
                          metavar="T[,T...]", help="with --sample-quality: prior temperatures to "
                          "score, the prior's noise scaled by T (default: 1.0)")
    evaluate.add_argument("--bootstrap", type=positive_int, default=100, metavar="B",
                          help="with --sample-quality: bootstrap resamples per interval "
                          "(default: 100)")
    evaluate.add_argument("--features", metavar="dinov2:PATH", help="with --sample-quality "
                          "on natural RGB images: score in the features of a DINOv2 checkpoint "
                          "on disk (a Hugging Face folder with config.json and "
                          "model.safetensors; needs vaekit[dinov2]) instead of vaekit's own "
                          "network; never downloaded at run time")

    score = commands.add_parser(
        "score", help="score new data: log p(x) of every example, or an out-of-distribution "
        "report of two sets", description="Scores every example of --data under the run's "
        "model (through the run's own pipeline): importance-sampled log p(x) with its standard "
        "error, bits per dimension, the ELBO and its two terms, a reconstruction error, the "
        "posterior mean code, and the percentile of log p(x) among the run's test examples "
        "(scored once and cached in the run folder). With --against OUT: an "
        "out-of-distribution report (AUROC, AUPR, FPR at 95% TPR with bootstrap intervals) "
        "for the raw likelihood, typicality, input complexity and, with --background, the "
        "likelihood ratio, as JSON and an HTML page.")
    score.add_argument("run_dir", metavar="RUN_DIR")
    score.add_argument("--data", required=True, metavar="NEW", help="data to score: digits, "
                       "mnist, fashion-mnist (their test split), a folder of images, an IDX "
                       "images file, or a .npy/.npz/.csv file; in-distribution set with --against")
    score.add_argument("--against", metavar="OUT", help="an out-of-distribution set (same "
                       "kinds as --data): write a detection report of --data against it")
    score.add_argument("--background", metavar="RUN_DIR", help="a run trained on the same data "
                       "with vaekit train --perturb 0.2: adds the likelihood ratio of Ren et al. "
                       "2019 to the report")
    score.add_argument("--out", metavar="FILE.csv", help="per-example scores to write (default: "
                       "RUN_DIR/scores-NAME.csv; with --against, both sets with a set column: "
                       "RUN_DIR/ood-IN-vs-OUT.csv)")
    score.add_argument("--report", metavar="FILE.html", help="with --against: the page to write, "
                       "its JSON beside it as FILE.json (default: RUN_DIR/ood-IN-vs-OUT.html)")
    score.add_argument("--k", type=positive_int, default=1000, help="importance samples per "
                       "example (default: 1000); the test set is scored at the same k")
    score.add_argument("--limit", type=positive_int, metavar="N", help="only the first N "
                       "examples of each set")
    score.add_argument("--seed", type=seed_number, default=0, help="seed of the importance samples "
                       "(default: 0)")
    score.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap "
                       "resamples of the report's intervals (default: 1000)")
    score.add_argument("--typicality-batch", type=positive_int, default=1, metavar="M",
                       help="also test typicality on batches of M examples (Nalisnick et al. "
                       "2019b; default: 1, single examples only)")
    score.add_argument("--json", action="store_true", help="print the summary (or the report) "
                       "as JSON on stdout")
    score.add_argument("--batch-size", type=positive_int, metavar="N", help="examples per "
                       "chunk of the estimator (default: sized to the cache)")
    score.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    score.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")

    explain = commands.add_parser(
        "explain", help="write an HTML report of the note's demonstrations on a run",
        description="Computes, on the run's own model and data: a shifted vs a damaged image "
        "(pixel distance vs log p(x)); naive vs importance-sampled log p(x) against k; the ELBO "
        "gap per example; the gap left by each posterior family (diagonal, full-covariance, IAF "
        "encoders fitted to the run's decoder); the training curves of both ELBO terms; the "
        "gradient variance of the reparameterisation trick vs the score function. Writes RUN_DIR/explain.html (figures "
        "embedded, opens from disk) and RUN_DIR/explain-*.png.")
    explain.add_argument("run_dir", metavar="RUN_DIR")
    explain.add_argument("--examples", type=positive_int, default=100, help="test examples for "
                         "the estimator comparison and the ELBO gap (default: 100)")
    explain.add_argument("--k", type=positive_int, default=5000, help="largest number of "
                         "samples per example (default: 5000)")
    explain.add_argument("--gradient-repeats", type=positive_int, default=100,
                         help="independent gradient estimates per estimator and sample count "
                         "(default: 100)")
    explain.add_argument("--refit-steps", type=positive_int, default=1000,
                         help="training batches for each posterior family fitted to the run's "
                         "decoder (default: 1000)")
    explain.add_argument("--seed", type=seed_number, default=0, help="seed of all the noise (default: 0)")
    explain.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    interp = commands.add_parser("interpolate", help="decode the path between two test examples",
                                 description="Encode two test examples (posterior means) and "
                                 "decode the codes on the path between them: spherical for the "
                                 "normal prior, a straight line in the unit cube for the uniform "
                                 "prior.")
    interp.add_argument("run_dir", metavar="RUN_DIR")
    interp.add_argument("--from", dest="start", type=non_negative_int, metavar="I",
                        help="test example at the start (default: 0)")
    interp.add_argument("--to", dest="end", type=non_negative_int, metavar="J",
                        help="test example at the end (default: 1)")
    interp.add_argument("--random", action="store_true", help="pick two test examples at random "
                        "(with --seed) instead of --from/--to")
    interp.add_argument("--seed", type=seed_number, default=0, help="seed of --random (default: 0)")
    interp.add_argument("--steps", type=positive_int, default=10, help="codes on the path, both "
                        "ends included (default: 10)")
    interp.add_argument("--mode", choices=("spherical", "linear"), help="path between the codes "
                        "(default: spherical for the normal prior, linear for the uniform)")
    interp.add_argument("--out", metavar="FILE.png", help="image to write (default: "
                        "RUN_DIR/interpolation-I-J.png)")
    interp.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    trav = commands.add_parser("traverse", help="vary one latent dimension at a time",
                               description="One row per latent dimension, ordered by use (mean "
                               "KL per dimension on the test set): the dimension sweeps the "
                               "prior's range while the others keep a base code. Unused "
                               "dimensions are marked.")
    trav.add_argument("run_dir", metavar="RUN_DIR")
    trav.add_argument("--dims", type=int_list, metavar="D[,D...]", help="dimensions to show, "
                      "numbered from 0 (default: all)")
    trav.add_argument("--steps", type=positive_int, default=9, help="values per row (default: 9)")
    trav.add_argument("--range", dest="width", type=positive_float, default=3.0, metavar="R",
                      help="sweep +-R prior standard deviations around the prior's centre, within "
                      "its support (default: 3)")
    trav.add_argument("--base", type=index_or_centre, default=None, metavar="centre|I",
                      help="code the other dimensions keep: the prior's centre (default) or test "
                      "example I's posterior mean")
    trav.add_argument("--group", metavar="NAME", help=GROUP_HELP)
    trav.add_argument("--out", metavar="FILE.png", help="image to write (default: "
                      "RUN_DIR/traversal.png)")
    trav.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    mani = commands.add_parser("manifold", help="decode a grid over the latent plane",
                               description="Decode a grid of codes laid out by the prior's "
                               "inverse CDF (Kingma & Welling 2014). A 2-D latent space is shown "
                               "whole; otherwise the plane of the two most-used dimensions, the "
                               "others at a base code.")
    mani.add_argument("run_dir", metavar="RUN_DIR")
    mani.add_argument("--grid", type=positive_int, default=20, help="points per side (default: "
                      "20)")
    mani.add_argument("--base", type=index_or_centre, default=None, metavar="centre|I",
                      help="code the other dimensions keep when there are more than 2: the "
                      "prior's centre (default) or test example I's posterior mean")
    mani.add_argument("--group", metavar="NAME", help=GROUP_HELP)
    mani.add_argument("--out", metavar="FILE.png", help="image to write (default: "
                      "RUN_DIR/manifold.png)")
    mani.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    embed = commands.add_parser("embed", help="scatter the test set's posterior means",
                                description="Posterior means of the test set, coloured by label: "
                                "as they are in 2-D, else projected by PCA. Also saves the means, "
                                "scales and labels as a .npz file.")
    embed.add_argument("run_dir", metavar="RUN_DIR")
    embed.add_argument("--out", metavar="FILE.png", help="image to write (default: "
                       "RUN_DIR/embedding.png)")
    embed.add_argument("--npz", metavar="FILE.npz", help="arrays to write: means, scales, labels "
                       "(-1: none), label_names, projection (default: RUN_DIR/embeddings.npz)")
    embed.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    explore = commands.add_parser("explore", help="steer the latent space in a web browser",
                                  description="A local web app: one slider per latent dimension, "
                                  "sampling, encoding test or uploaded images, interpolation; a "
                                  "JSON API with an OpenAPI description at /api/openapi.json. "
                                  "Needs the explore extra: pip install 'vaekit[explore]'.")
    explore.add_argument("run_dir", metavar="RUN_DIR")
    explore.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                         "127.0.0.1, this computer only)")
    explore.add_argument("--port", type=port_number, default=8000, help="port (default: "
                         "8000; 0 picks a free one)")
    explore.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                         help="also accept requests addressed to this host name (the Host header; "
                         "localhost and IP addresses are always accepted)")
    explore.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    push = commands.add_parser("push", help="upload a run (or a saved model) to the Hugging "
                               "Face Hub", description="Upload RUN_DIR's config.json, "
                               "model.safetensors, model card README.md (refreshed first), "
                               "pictures, metrics and evaluation to the Hub repository REPO_ID "
                               "(created if missing); anyone can then load it with "
                               "LatentModel.from_pretrained(REPO_ID). Checkpoints stay local. "
                               "Needs pip install 'vaekit[hub]' and a login (hf auth login, or "
                               "HF_TOKEN).")
    push.add_argument("run_dir", metavar="RUN_DIR")
    push.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository private")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .threads import choose_threads, prepare_openmp

    prepare_openmp()  # before torch is imported: OpenMP reads its wait policy once
    try:
        threads = choose_threads()
        if threads and os.environ.get("RANK", "0") == "0":
            print(f"vaekit: {threads}", file=sys.stderr)
        return COMMANDS[args.command](args)
    except VaekitError as exc:
        message = f"vaekit {args.command}: error: {exc}"
        record_for_launcher(message)
        # In a distributed run the failing process prints; the ones it stopped stay quiet.
        if not getattr(exc, "reported_elsewhere", False):
            print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vaekit {args.command}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_train(args) -> int:
    if args.nproc is not None:
        from .distributed import launch

        return launch(args.nproc, _without_nproc(args.argv))  # this command, in N processes
    from .train import Interrupted, train

    overrides = config_overrides(args, TrainConfig)
    if args.config is not None:
        if args.resume is not None:
            raise VaekitError("--config starts a new run; a resumed run keeps the options in its "
                              "own config.json (drop --config)")
        from . import jsonio
        from .config import options_from_file
        from .errors import ConfigError

        path = Path(args.config)
        values = jsonio.read_json(path, "a config file", error=ConfigError,
                                  fix="give a JSON object of training options")
        overrides = {**options_from_file(values, str(path)), **overrides}
    try:
        train(TrainConfig() if args.resume is None else None, resume=args.resume,
              overrides=overrides, inexact_resume=args.inexact_resume)
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # every process stopped; one says so
            print(f"vaekit train: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """argv less --nproc N (or an abbreviation argparse accepted, such as --npro=N)."""
    spellings = ("--np", "--npr", "--npro", "--nproc")
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in spellings:
            skip = True  # its value follows
        elif token.split("=", 1)[0] not in spellings:
            kept.append(token)
    return kept


def _load(run_dir: str, device: str):
    from .device import resolve_device
    from .runs import RunLock, load_run

    run = load_run(run_dir, resolve_device(device))
    holder = RunLock.holder(run.path)
    if holder is not None:
        epochs = sum(1 for m in _metrics(run.path) if m.get("complete", True))
        print(f"vaekit: note: {run.path} is still being trained by {holder}; using the weights "
              f"saved after epoch {epochs}", file=sys.stderr)
    return run


def _metrics(run_dir: Path) -> list[dict]:
    from .report import read_metrics

    return [m for m in read_metrics(run_dir) if "early_stopping" not in m]


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .viz import class_rows_image, examples_image, save_png

    if not 0 <= args.temperature <= 10:  # also refuses nan
        raise VaekitError(f"--temperature {args.temperature}: give a number from 0 to 10 (1 is "
                          "the prior itself)")
    run = _load(args.run_dir, args.device)
    pipeline, names = run.pipeline, run.label_names
    if args.label is not None and names is None:
        raise VaekitError(f"{run.path} is not a conditional run, so --label has no meaning; "
                          "drop it, or train with --conditional")
    label = None if args.label is None else resolve_label(args.label, names)
    grid = names is not None and label is None  # one row per class
    count = len(names) * args.per_class if grid else args.n
    tag = f"-label{label}" if label is not None else "-classes" if grid else ""
    tag += f"-t{args.temperature:g}" if args.temperature != 1.0 else ""
    out = Path(args.out) if args.out else run.path / f"samples-{count}{tag}-seed{args.seed}.png"
    _check_output(out, ".png")
    _check_decoding(f"-n {count}" if not grid else f"--per-class {args.per_class}", count, run)
    if args.save_array:
        _check_output(Path(args.save_array), ".npy")
    device = next(run.model.parameters()).device
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if grid:
            y = torch.arange(len(names), device=device).repeat_interleave(args.per_class)
        else:
            y = None if label is None else torch.full((count,), label, device=device)
        samples = run.model.sample(count, y, mean=not args.draw,
                                   temperature=args.temperature)  # (count, *shape)
    shown = pipeline.display(samples)
    with _writing(out):
        save_png(class_rows_image(shown, names, features=run.features) if grid else
                 examples_image(shown, features=run.features), out)
    given = f", y = {names[label]} (class {label})" if label is not None else \
        f", one row per class ({len(names)} classes)" if grid else ""
    tempered = f" at temperature {args.temperature:g}" if args.temperature != 1.0 else ""
    print(f"wrote {out} ({count} samples, {'drawn from' if args.draw else 'mean of'} p(x|z), "
          f"z ~ p(z) {run.config.prior}{tempered}{given})")
    if args.save_array:
        import io

        from .runs import atomic_write_bytes

        target = Path(args.save_array)
        buffer = io.BytesIO()
        np.save(buffer, shown.cpu().numpy())
        with _writing(target):  # atomic: never half an array, never through a FIFO
            atomic_write_bytes(target, buffer.getvalue())
        print(f"wrote {target} {tuple(shown.shape)}")
    return 0


def cmd_reconstruct(args) -> int:
    import torch

    from .runs import load_run_dataset
    from .viz import reconstruction_image, save_png

    run = _load(args.run_dir, args.device)
    dataset, pipeline = load_run_dataset(run), run.pipeline
    from .loop import picture_rows

    split_x = dataset.test_x if args.split == "test" else dataset.train_x
    rows = picture_rows(len(split_x), args.n)  # seeded: every class, not the first one only
    raw = split_x[rows]
    labels = (dataset.test_y if args.split == "test" else dataset.train_y)[rows] \
        if run.config.conditional else None
    out = Path(args.out) if args.out else run.path / f"reconstructions-{args.split}.png"
    _check_output(out, ".png")
    device = next(run.model.parameters()).device
    with torch.inference_mode():
        x = pipeline.fixed(raw.to(device), 0, args.split)
        y = None if labels is None else labels.to(device)
        reconstructions = run.model.reconstruct(x, y)
    inputs = pipeline.display(x) if pipeline.noisy else None  # what the model sees
    with _writing(out):
        save_png(reconstruction_image(pipeline.original(raw.to(device)),
                                      pipeline.display(reconstructions), inputs=inputs,
                                      input_name=pipeline.input_name, features=run.features), out)
    shown = f"originals, {pipeline.input_name}s" if inputs is not None else "originals"
    print(f"wrote {out} ({len(raw)} {args.split} examples, seeded random: {shown} above "
          "their reconstructions)")
    return 0


def resolve_label(text: str, names: list[str]) -> int:
    """A class given by name (first) or by index -> its index."""
    if text in names:
        return names.index(text)
    folded = [name.casefold() for name in names]
    if folded.count(text.casefold()) == 1:  # "Sandal" for "sandal", unless that is ambiguous
        return folded.index(text.casefold())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
        return int(text)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise VaekitError(f"--label {text!r} is not a class of this run: give a name ({shown}) or an "
                      f"index 0..{len(names) - 1}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} minutes"


MAX_QUALITY_SAMPLES = 200_000  # sample_quality.MAX_SAMPLES (cli.py stays torch-free)


def cmd_evaluate(args) -> int:
    quality_options = [name for name, given in (("--samples", args.samples is not None),
                                                ("--temperatures", args.temperatures != [1.0]),
                                                ("--bootstrap", args.bootstrap != 100),
                                                ("--features", args.features is not None))
                        if given]
    if quality_options and not args.sample_quality:
        raise VaekitError(f"{quality_options[0]} belongs to --sample-quality; add "
                          "--sample-quality or drop it")
    if args.samples is not None and not 10 <= args.samples <= MAX_QUALITY_SAMPLES:
        raise VaekitError(f"--samples {args.samples:,}: give 10 to {MAX_QUALITY_SAMPLES:,} "
                          "samples")
    if args.bootstrap < 10 or args.bootstrap > 10_000:
        raise VaekitError(f"--bootstrap {args.bootstrap}: give 10 to 10,000 resamples (a 95 % "
                          "interval needs at least 10)")
    if args.features is not None:  # before minutes of importance sampling, not after
        from .pretrained_features import parse_features

        parse_features(args.features)
    from . import jsonio
    from .device import resolve_device
    from .distributed import DistContext
    from .estimate import evaluate_run
    from .model_card import write_run_card
    from .report import evaluation_table
    from .runs import atomic_write_json, load_run, load_run_dataset, writing

    device = resolve_device(args.device)
    dist = DistContext.from_env(device.type)
    try:
        device = resolve_device(args.device, dist)
        run = load_run(args.run_dir, device)
        dataset = load_run_dataset(run)
        if args.sample_quality and dist.world_size > 1:
            raise VaekitError("--sample-quality runs in one process; run it without torchrun")
        total = len(dataset.test_x if args.split == "test" else dataset.train_x)
        total = min(total, args.limit or total)
        if args.batch_size:
            _check_decoding(f"--batch-size {args.batch_size} (16 samples of each example per "
                            "decoder pass)", min(args.batch_size, total) * 16, run)
        choice = {"k": args.k, "mode": "given with --k"}
        if args.k is None:
            from .estimate.evaluation import choose_k

            choice = choose_k(run, dataset, split=args.split, n=total,
                              budget_seconds=args.time_budget, naive=args.naive, seed=args.seed)
            if dist.is_main:
                print(f"k = {choice['k']}, chosen for --time-budget {args.time_budget:g} s "
                      f"(measured {1e3 * choice['seconds_per_sample']:.3g} ms per example and "
                      f"sample): {total} examples in about "
                      f"{_duration(choice['expected_seconds'])}; --k 5000 for published "
                      "figures", file=sys.stderr, flush=True)
        bar = _progress_bar(total, "log p(x)", args.progress and dist.is_main)
        try:
            result = evaluate_run(run, dataset, split=args.split, k=choice["k"],
                                  limit=args.limit,
                                  seed=args.seed, batch_size=args.batch_size, naive=args.naive,
                                  dist=dist, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        if not dist.is_main:
            return 0
        result["k_choice"] = choice
        if args.sample_quality:
            from .sample_quality import evaluate_sample_quality

            result["sample_quality"] = evaluate_sample_quality(
                run, dataset, samples=args.samples, temperatures=tuple(args.temperatures),
                seed=args.seed, bootstrap=args.bootstrap, features_spec=args.features,
                log=(lambda message: print(message, file=sys.stderr)) if args.progress else None)
        target = run.path / "evaluation.json"
        with writing("cannot write the evaluation", target, "make the run folder writable"):
            atomic_write_json(target, result)
            write_run_card(run.path)  # README.md shows the new figures
        if args.json:
            print(jsonio.dumps(result, indent=2))  # standard JSON: no NaN tokens
        else:
            print(evaluation_table(result))
            print(f"wrote {target}")
        return 0
    finally:
        dist.shutdown()


def cmd_explain(args) -> int:
    from .report import explain
    from .runs import load_run_dataset

    from .budget import check_at_most, check_elements

    if args.k < 2 or args.examples < 2:
        raise VaekitError("--k and --examples must be at least 2 (an error bar needs two samples)")
    run = _load(args.run_dir, args.device)
    dataset = load_run_dataset(run)
    examples = min(args.examples, len(dataset.test_x))
    check_elements(f"--k {args.k} with --examples {examples} (two log-weights per sample and "
                   "example)", 2 * args.k * examples, 4, "lower --k or --examples")
    check_at_most("--refit-steps", args.refit_steps, 10**6, "each step trains an encoder on "
                  "one batch", VaekitError)
    page = explain(run, dataset, seed=args.seed, examples=args.examples, k=args.k,
                   gradient_repeats=args.gradient_repeats, refit_steps=args.refit_steps,
                   log=lambda message: print(message, file=sys.stderr))
    print(f"wrote {page} (open it in a browser; figures also saved as "
          f"{run.path / 'explain-*.png'})")
    return 0


def cmd_score(args) -> int:
    from . import jsonio
    from .scoring import reference_scores, scores_csv

    if args.k < 2:
        raise VaekitError("--k must be at least 2 (a standard error needs two samples)")
    if args.bootstrap > MAX_BOOTSTRAP:
        raise VaekitError(f"--bootstrap {args.bootstrap} is more resamples than an interval "
                          f"needs; give at most {MAX_BOOTSTRAP:,} (1,000 is plenty)")
    if args.against is None and (args.background or args.report or args.typicality_batch > 1):
        raise VaekitError("--background, --report and --typicality-batch belong to the "
                          "out-of-distribution report; add --against OUT")
    run = _load(args.run_dir, args.device)
    if run.config.conditional:
        raise VaekitError(f"{run.path} is conditional (it models log p(x | y)); score with an "
                          "unconditional run")
    background = None
    if args.background:
        from .ood_report import check_background

        background = _load(args.background, args.device)
        check_background(run, background)
    ood = args.against is not None
    stem = _data_stem(args.data) + (f"-vs-{_data_stem(args.against)}" if ood else "")
    out = Path(args.out) if args.out else run.path / f"{'ood' if ood else 'scores'}-{stem}.csv"
    _check_output(out, ".csv")
    page = None
    if ood:
        page = Path(args.report) if args.report else run.path / f"ood-{stem}.html"
        _check_output(page, ".html")
    sets = [_new_data(run, args.data, args.limit)]
    if ood:
        sets.append(_new_data(run, args.against, args.limit))
        for (raw, what), option in zip(sets, ("--data", "--against")):
            if len(raw) < 2 * args.typicality_batch:
                need = "2 examples" if args.typicality_batch == 1 else \
                    f"2 batches of --typicality-batch {args.typicality_batch}"
                raise VaekitError(f"{option} {what}: {len(raw)} example(s) are too few for a "
                                  f"detection report, which needs at least {need}; give more "
                                  "data" + ("" if args.typicality_batch == 1
                                            else " or a smaller --typicality-batch"))
    if background is not None and background.config.perturb == 0:
        print(f"vaekit score: warning: --background {background.path} was not trained with "
              "--perturb; Ren et al.'s background model is trained on perturbed inputs",
              file=sys.stderr)

    def bar(total: int, what: str):
        return _progress_bar(total, what, args.progress)

    n_test = run.data["n_test"]
    with _closing(bar(n_test, f"test set, k = {args.k}")) as progress:  # unless cached
        reference = reference_scores(run, args.k, args.seed, batch_size=args.batch_size,
                                     progress=progress.update if progress else None,
                                     warn=lambda m: print(f"vaekit score: {m}", file=sys.stderr))
    if not ood:
        return _score_one(args, run, sets[0], reference, out)
    from .ood_report import detections_table, ood_report, report_page, score_set

    scored = []
    for (raw, what), role in zip(sets, ("in", "out")):
        passes = len(raw) * (2 if background is not None else 1)
        with _closing(bar(passes, f"{role}: {what}")) as progress:
            scored.append(score_set(run, raw, what, k=args.k, seed=args.seed,
                                    reference_mean=float(reference.log_px.mean()),
                                    background=background,
                                    typicality_batch=args.typicality_batch,
                                    batch_size=args.batch_size,
                                    progress=progress.update if progress else None))
    result = ood_report(run, *scored, reference=reference, bootstrap=args.bootstrap,
                        seed=args.seed, background=background)
    rows = []
    for role, item in zip(("in", "out"), scored):
        rows.append((role, item.scores, {name: values for name, values in item.ood_scores.items()
                                         if len(values) == len(item.scores)}))
    _write(out, scores_csv(rows, reference))
    _write(page.with_suffix(".json"), jsonio.dumps(result, indent=2) + "\n")
    _write(page, report_page(run, result, *scored))
    if args.json:
        print(jsonio.dumps(result, indent=2))
        return 0
    print(f"vaekit score {run.path}: {scored[0].name} (in) against {scored[1].name} (out), "
          f"k = {args.k}")
    print(f"mean log p(x): in {result['in']['log_px_mean']:.2f}, out "
          f"{result['out']['log_px_mean']:.2f}, test set {result['reference']['log_px_mean']:.2f}"
          " nats")
    print(detections_table(result))
    print(f"wrote {page}, {page.with_suffix('.json')} and {out}")
    return 0


MAX_BOOTSTRAP = 100_000


def _score_one(args, run, new, reference, out: Path) -> int:
    from . import jsonio
    from .scoring import data_key, score_examples, scores_csv, scores_summary

    raw, what = new
    with _closing(_progress_bar(len(raw), what, args.progress)) as progress:
        scores = score_examples(run.model, raw, run.pipeline, k=args.k, seed=args.seed,
                                split=data_key(raw), batch_size=args.batch_size,
                                progress=progress.update if progress else None)
    _write(out, scores_csv([("new", scores, {})], reference))
    summary = scores_summary(scores, reference, data=what)
    summary.update(run=str(run.path), scores_csv=str(out))
    if args.json:
        print(jsonio.dumps(summary, indent=2))
        return 0
    n = len(scores)
    print(f"vaekit score {run.path}: {what}, k = {args.k} importance samples per example")
    print(f"log p(x) is the likelihood of: {scores.description}")
    print(f"  mean log p(x)        {summary['log_px_mean']:10.2f} nats (s.e. "
          f"{summary['log_px_mean_se']:.2g})   test set {summary['test_log_px_mean']:.2f} "
          f"({len(reference):,} examples)")
    if scores.bits_per_dim is not None:
        print(f"  bits per dimension   {summary['bits_per_dim_mean']:10.4f}        "
              f"              test set {summary['test_bits_per_dim_mean']:.4f}")
    print(f"  ELBO                 {summary['elbo_mean']:10.2f} nats; reconstruction error "
          f"{summary['reconstruction_error_mean']:.4g} per dimension")
    print(f"  percentile of log p(x) among the test set: median {summary['percentile_median']:.1f};"
          f" below the test set's 1st percentile: {summary['below_test_1st_percentile']} of {n}, "
          f"below its 5th: {summary['below_test_5th_percentile']} of {n}")
    print(f"wrote {out} ({n:,} rows)")
    return 0


def _new_data(run, source: str, limit: int | None):
    from .scoring import load_new_data

    raw, what = load_new_data(run, source)
    if limit is not None and limit < len(raw):
        raw, what = raw[:limit], f"{what}, first {limit}"
    return raw, what


def _data_stem(source: str) -> str:
    name = Path(source).name or source
    for suffix in (".gz", ".npy", ".npz", ".csv"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "data"


def _write(path: Path, text: str) -> None:
    from .runs import atomic_write_text, writing

    with writing(f"cannot write {path}", path, "choose a writable place"):
        atomic_write_text(path, text)


class _closing:
    """with-block for an optional tqdm bar: closes it if there is one."""

    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _progress_bar(total: int, what: str, enabled: bool):
    """A tqdm bar on stderr counting examples, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="example", leave=False, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def _latent_space(args):
    from .latent_space import LatentSpace

    run = _load(args.run_dir, args.device)
    group = getattr(args, "group", None)
    return run, LatentSpace.of_run(run, group=group,
                                   context=getattr(args, "base", None) if group else None)


def _of_group(args) -> str:
    if not args.group:
        return ""
    above = "prior means" if args.base is None else f"test example {args.base}'s posterior means"
    return f" of group {args.group}, the groups above at {'their ' if args.base is None else ''}{above}"


def cmd_interpolate(args) -> int:
    from .viz import interpolation_image, save_png

    if args.random and (args.start is not None or args.end is not None):
        raise VaekitError("--random picks both ends itself; give either --random or --from I "
                          "--to J")
    run, space = _latent_space(args)
    if args.random:
        import torch

        n = len(space.test_x)
        if n < 2:
            raise VaekitError(f"the test set holds {n} example; --random needs two")
        generator = torch.Generator().manual_seed(args.seed)
        start, end = torch.randperm(n, generator=generator)[:2].tolist()
    else:
        start = 0 if args.start is None else args.start
        end = 1 if args.end is None else args.end
    out = Path(args.out) if args.out else run.path / f"interpolation-{start}-{end}.png"
    _check_output(out, ".png")
    _check_decoding(f"--steps {args.steps}", args.steps, run)
    interpolation = space.interpolation(start, end, args.steps, args.mode)
    with _writing(out):
        save_png(interpolation_image(interpolation, run.features), out)
    print(f"wrote {out} (test examples {start} -> {end}, {args.steps} codes on a "
          f"{interpolation.mode} path)")
    return 0


def cmd_traverse(args) -> int:
    from .viz import save_png, traversal_image

    run, space = _latent_space(args)
    out = Path(args.out) if args.out else run.path / "traversal.png"
    _check_output(out, ".png")
    rows = len(args.dims) if args.dims else space.latent_dim
    _check_decoding(f"--steps {args.steps} ({rows} rows)", rows * args.steps, run)
    traversal = space.traversal(args.dims, args.steps, args.width, args.base)
    with _writing(out):
        save_png(traversal_image(traversal, run.features), out)
    rows = ", ".join(f"z{d} {kl:.2f}" + (" (unused)" if unused else "")
                     for d, kl, unused in zip(traversal.dims, traversal.kl.tolist(),
                                              traversal.unused))
    print(f"wrote {out} (rows by mean KL per dimension{_of_group(args)}, nats: {rows})")
    return 0


def cmd_manifold(args) -> int:
    from .viz import manifold_image, save_png

    run, space = _latent_space(args)
    out = Path(args.out) if args.out else run.path / "manifold.png"
    _check_output(out, ".png")
    _check_decoding(f"--grid {args.grid} ({args.grid}**2 codes)", args.grid ** 2, run)
    manifold = space.manifold(args.grid, args.base)
    with _writing(out):
        save_png(manifold_image(manifold, run.features), out)
    x_dim, y_dim = manifold.dims
    plane = "the whole 2-D latent space" if space.latent_dim == 2 else (
        f"the plane of z{x_dim} and z{y_dim}, the others at {manifold.base_name}")
    print(f"wrote {out} ({args.grid} x {args.grid} grid over {plane}{_of_group(args)})")
    return 0


def cmd_embed(args) -> int:
    import io

    import numpy as np

    from .runs import atomic_write_bytes
    from .viz import embedding_image, save_png

    run, space = _latent_space(args)
    out = Path(args.out) if args.out else run.path / "embedding.png"
    arrays = Path(args.npz) if args.npz else run.path / "embeddings.npz"
    _check_output(out, ".png")
    _check_output(arrays, ".npz")
    embedding = space.embeddings()
    _, axis_names, projection = embedding.projection()
    n = len(embedding.means)
    labels = embedding.labels if embedding.labels is not None else np.full(n, -1)
    buffer = io.BytesIO()
    np.savez(buffer, means=embedding.means.numpy(), scales=embedding.scales.numpy(),
             labels=np.asarray(labels, dtype=np.int64),
             label_names=np.array(embedding.label_names or [], dtype=str),
             projection=projection.numpy(), axis_names=np.array(axis_names, dtype=str))
    with _writing(out):
        save_png(embedding_image(embedding), out)
    with _writing(arrays):
        atomic_write_bytes(arrays, buffer.getvalue())
    print(f"wrote {out} ({n} test examples; axes: {axis_names[0]}, {axis_names[1]})")
    print(f"wrote {arrays} (means and scales {tuple(embedding.means.shape)}, labels)")
    return 0


def cmd_explore(args) -> int:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: image uploads)
        import uvicorn  # noqa: F401
    except ImportError:
        print("vaekit explore: error: the web explorer is not installed; install it with: pip "
              "install 'vaekit[explore]'", file=sys.stderr)
        return 2
    from .explore.server import serve

    serve(args.run_dir, host=args.host, port=args.port, allowed_hosts=args.allow_host,
          device=args.device)
    return 0


def _writing(path: Path):
    """A write that fails (read-only folder, full disk, file size limit) is one line, and the
    atomic writers leave nothing behind (runs.writing)."""
    from .runs import writing

    return writing(f"cannot write {path}", path, "free some space or choose a writable --out")


def _check_decoding(what: str, count: int, run) -> None:
    """Refuse to decode `count` codes at once when their outputs could not fit in memory."""
    import math

    from .budget import check_elements

    dims = math.prod(run.data["shape"])
    outputs = math.prod(run.model.likelihood.params_shape)  # the decoder's numbers per code
    widest = max([dims, run.config.latent_dim, *run.config.hidden])
    check_elements(f"{what} (decoding {count:,} codes of {dims}-dimensional examples)", count,
                   4 * (outputs + dims + widest), "lower it")


def _check_output(path: Path, suffix: str) -> None:
    if path.suffix.lower() != suffix:
        raise VaekitError(f"{path}: output must end in {suffix}")
    if not path.parent.exists():
        raise VaekitError(f"{path.parent}: no such folder; create it or choose another output")
    if path.is_dir():
        raise VaekitError(f"{path} is a folder; give a file name ending in {suffix}")


def cmd_push(args) -> int:
    from .hub import push_folder

    url = push_folder(args.run_dir, args.repo_id, private=args.private)
    print(url)
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "reconstruct": cmd_reconstruct,
            "evaluate": cmd_evaluate, "score": cmd_score, "explain": cmd_explain,
            "interpolate": cmd_interpolate, "traverse": cmd_traverse, "manifold": cmd_manifold,
            "embed": cmd_embed, "explore": cmd_explore, "push": cmd_push}


if __name__ == "__main__":
    raise SystemExit(main())
