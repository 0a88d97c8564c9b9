"""Build docs/tutorial.ipynb from the cells below, execute it and render docs/tutorial.html.

    python docs/build_tutorial.py              # needs the test extra (nbclient, ipykernel) and nbconvert
    python docs/build_tutorial.py --text-only  # after editing markdown only: render again

The notebook is the study note of the README's "The note, point by point", run with vaekit's
Python API on the built-in digits. Edit the cells here, not the .ipynb, and run this again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

CELLS = [
    ("md", """# vaekit tutorial: the VAE, point by point

This notebook walks through the study note vaekit grew from (the README's *The note, point by
point*), in its order, with vaekit's Python API on the built-in 8x8 digits (offline). Every
figure is computed here; a few lines under each say what it shows. The runs are tiny (a few
epochs, small k) so that the notebook runs in under a minute or two on 2 CPU cores: the numbers
are those of quick models, and the README gives the figures of real runs.

Run it with `pip install -e ".[test]"` (or `pip install vaekit jupyter`) and open it in Jupyter;
`docs/tutorial.html` is the same notebook, rendered."""),
    ("code", """import tempfile
from pathlib import Path

import torch
from IPython.display import display

import vaekit
from vaekit import TrainConfig, load_run
from vaekit import viz
from vaekit.runs import load_run_dataset, read_metrics

torch.manual_seed(0)
work = Path(tempfile.mkdtemp(prefix="vaekit-tutorial-"))
quiet = lambda *args, **kwargs: None  # training prints a line per epoch; kept quiet here
SMALL = dict(data="digits", hidden=[128], batch_size=64, progress=False,
             checkpoint_every_minutes=60.0)"""),
    ("md", """## Points 1-2: a VAE generates; training maximises the likelihood

One call trains a VAE (the ELBO, maximised with Adam) and writes a run folder: `config.json`,
`model.safetensors`, `metrics.jsonl`, pictures and a model card `README.md`. `load_run` rebuilds
the model and the data pipeline from it, without pickle."""),
    ("code", """run_dir = vaekit.train(TrainConfig(**SMALL, epochs=20, latent_dim=8, out=str(work / "digits")),
                       log=quiet)
run = load_run(run_dir)
dataset = load_run_dataset(run)
model, pipeline = run.model, run.pipeline
print(sorted(p.name for p in run_dir.iterdir()))
print(f"last test ELBO: {read_metrics(run_dir)[-1]['test_elbo']:.2f} nats per example")"""),
    ("code", """new = model.sample(48, mean=True, generator=torch.Generator().manual_seed(0))  # z ~ p(z), E[x|z]
display(viz.titled(viz.examples_image(pipeline.display(new)), "new digits: z ~ p(z), then E[x | z]"))
x = pipeline.fixed(dataset.test_x[:16], 0)
display(viz.titled(viz.reconstruction_image(pipeline.display(x), pipeline.display(model.reconstruct(x))),
                   "test digits above their reconstructions"))"""),
    ("md", """The first grid is what a VAE is for: digits that were never in the data, made by drawing
z from the prior and decoding it. The second is the autoencoder's view, the inputs above what the
model keeps of them; compressing is a side product. Both are blurry at this size and training
time: E[x | z] is the average of the pixels the model thinks likely."""),
    ("md", """## Points 4-6: the prior p(z) and the decoder p(x | z)

The prior is a `torch.distributions` object on the model; the decoder's output is a distribution
over x too (binarised pixels here, so a Bernoulli per pixel)."""),
    ("code", """print("prior:", model.prior)
z = model.prior.sample((3,))                       # (3, 8)
px = model.decode(z)
print("p(x|z):", px, "| log p(x|z) of its own mean:", px.log_prob((px.mean > 0.5).float()).tolist())"""),
    ("md", """## Points 7-8: a small network maps a plain Gaussian onto the data's manifold

A run with a 2-dimensional latent space lets the whole latent space be drawn: a grid of codes laid
out by the prior's inverse CDF (every cell the same prior mass), each decoded."""),
    ("code", """from vaekit.latent_space import LatentSpace

flat2 = load_run(vaekit.train(TrainConfig(**SMALL, epochs=20, latent_dim=2, out=str(work / "digits-2d")),
                              log=quiet))
space2 = LatentSpace.of_run(flat2, dataset)
display(viz.manifold_image(space2.manifold(grid=12)))
display(viz.embedding_image(space2.embeddings()))"""),
    ("md", """The manifold map is the decoder applied to a square of the Gaussian prior: a one-hidden-layer
network folds it onto digit shapes, with neighbouring codes giving similar digits. The scatter
shows where the encoder puts the test digits in that plane, coloured by their label: classes
occupy regions, though nothing told the model the labels."""),
    ("md", """## Points 9-11: naive Monte Carlo fails; importance sampling works

Point 10 first: a "2" shifted one pixel sideways keeps its meaning, yet its pixel distance to the
original is larger than that of the same "2" with a small piece erased."""),
    ("code", """from vaekit.estimate import evaluate
from vaekit.report import erase_patch, shift_right

two = dataset.test_x[dataset.test_y == 2][:1]               # (1, 1, 8, 8) uint8
variants = torch.cat([two, shift_right(two, 1), erase_patch(two, 2)])
names = ["original", "shifted 1 px", "piece erased"]
display(viz.titled(viz.examples_image(variants.float() / 255, columns=3), " | ".join(names)))
scores = evaluate(model, variants, pipeline, k=1000, naive=False).per_example["log_px"]
for name, image, log_px in zip(names, variants, scores.tolist()):
    mse = ((image.float() - two[0].float()) / 255).pow(2).mean().item()
    print(f"{name:13s} pixel MSE to the original {mse:.3f}   model log p(x) {log_px:8.2f}")"""),
    ("md", """By pixel MSE the erased digit is closer to the original than the shifted one, which is why a
likelihood built on pixel distance alone prefers the damaged digit. The model's log p(x) says how
probable each image is as a whole; on a tiny model and an 8x8 grid it can go either way, which is
the note's warning: pixel distance is not meaning.

Point 9 estimates p(x) by averaging p(x | z) over z drawn from the prior; point 11 says it fails.
Below, both estimators on the same 40 test digits as the number of samples k grows."""),
    ("code", """import math

from vaekit.plot import Chart
from vaekit.report import estimator_sweep

sweep = estimator_sweep(run, dataset.test_x[:40], k=1000, seed=0)
finite = lambda values: [v if math.isfinite(v) else 0.0 for v in values]  # no error bar at k = 1
chart = Chart(title="log p(x) estimates on 40 test digits", xlabel="samples k", ylabel="nats per example",
              logx=True)
chart.add(sweep.ks, [v[0] for v in sweep.importance], label="importance sampling, z ~ q(z|x)",
          error=finite([v[1] for v in sweep.importance]), style="line+points")
chart.add(sweep.ks, [v[0] for v in sweep.naive], label="naive, z ~ p(z)",
          error=finite([v[1] for v in sweep.naive]), style="line+points")
chart.add(sweep.ks, [sweep.elbo[0]] * len(sweep.ks), label="ELBO")
display(chart.render())
print("at k = 1000: importance %.2f (ESS %.1f), naive %.2f (ESS %.1f)" % (
    sweep.importance[-1][0], sweep.importance[-1][2], sweep.naive[-1][0], sweep.naive[-1][2]))"""),
    ("md", """Importance sampling (z drawn from the encoder's q(z | x)) settles within a few samples, above
the ELBO as it must. The naive estimate starts lower and needs far more samples: most z from the
prior decode to other digits and contribute almost nothing, so its effective sample size (printed)
is a small share of k where importance sampling keeps a large one. On 8x8 digits it catches up
by k = 1000; on 784-pixel Fashion-MNIST it is still about 20 nats short at k = 5000 (README):
the prior misses the posterior more, the more dimensions x has."""),
    ("md", """## Points 12-14: q(z | x), variational inference, the ELBO and its gap

The encoder gives q(z | x), a Gaussian whose parameters depend on x. Training maximises the
ELBO = log p(x) − KL(q(z | x) ‖ p(z | x)), so the gap log p(x) − ELBO is the KL that variational
inference minimises. The linear-Gaussian model (probabilistic PCA) has an exact log p(x) and an
exact posterior, so the gap can be checked exactly."""),
    ("code", """from vaekit.oracle import exact_elbo, exact_log_px, linear_gaussian_vae, sample_data

oracle = linear_gaussian_vae(data_dim=20, latent_dim=4, sigma=0.5)   # encoder = true posterior
data = sample_data(oracle, 400)
with torch.no_grad():
    print("exact posterior:    log p(x) %.4f   ELBO %.4f" % (exact_log_px(oracle, data).mean(),
                                                             exact_elbo(oracle, data).elbo.mean()))
with torch.no_grad():                       # move the encoder off the true posterior
    for p in oracle.encoder.parameters():
        p.mul_(0.8)
    print("imperfect encoder:  log p(x) %.4f   ELBO %.4f   (the gap is the KL to p(z|x))" % (
        exact_log_px(oracle, data).mean(), exact_elbo(oracle, data).elbo.mean()))
q = model.encode(x[:2])
print("the digits model's q(z|x):", q, "means", q.mean[0, :3].tolist())"""),
    ("code", """per_ex = sweep.per_example_log_px, sweep.per_example_elbo
scatter = Chart(title="ELBO against log p(x), one point per test digit", xlabel="log p(x) (IS, k = 1000)",
                ylabel="ELBO")
scatter.add(per_ex[0].tolist(), per_ex[1].tolist(), style="points", label="test digits")
lo, hi = float(per_ex[0].min()), float(per_ex[0].max())
scatter.add([lo, hi], [lo, hi], label="ELBO = log p(x)")
display(scatter.render())
print(f"mean gap log p(x) - ELBO: {(per_ex[0] - per_ex[1]).mean():.2f} nats")"""),
    ("md", """With the exact posterior the ELBO equals log p(x) to the last digit; spoil the encoder and the
ELBO drops while log p(x) stays: the difference is KL(q ‖ p(z | x)). On the digits model every
point lies below the diagonal: the ELBO is a lower bound, and its gap is what a better posterior
family could win back (below)."""),
    ("md", """## Point 15: the two terms

The ELBO is the reconstruction term E_q[log p(x | z)] minus KL(q(z | x) ‖ p(z)); vaekit logs
both, train and test, every epoch (`metrics.jsonl`)."""),
    ("code", """display(viz.curves_image(read_metrics(run_dir)))"""),
    ("md", """The reconstruction term rises as the decoder learns; the KL term rises too, because
codes that say more about x cost more nats against the prior. The ELBO is their difference, and
the test curves follow the train curves closely on this small model."""),
    ("md", """## Point 16: the reparameterisation trick

z = μ + σ ε with ε ~ N(0, I) makes the sample differentiable in the encoder's parameters. The
alternative, the score-function (REINFORCE) estimator, is unbiased too; its variance is the
problem."""),
    ("code", """from vaekit.gradients import gradient_variance

results = gradient_variance(model, x[:16], samples=(1, 10), repeats=20, seed=0)
for r in results:
    print(f"{r.estimator:20s} {r.samples:3d} samples: variance of the gradient {r.variance:12.4g}")
ratio = results[1].variance / results[0].variance
print(f"score function / reparameterisation at 1 sample: {ratio:,.0f} times the variance")"""),
    ("md", """At equal sample counts the reparameterised gradient of the ELBO has a variance orders of
magnitude below the score-function estimator's (the ratio is printed; the README measures about
46,000 times on Fashion-MNIST), which is why VAEs train with it."""),
    ("md", """## Point 3: steering the latent space

Traversals move one latent dimension at a time (most used first, by KL) with the others fixed;
an interpolation decodes the path between two test digits' codes."""),
    ("code", """space = LatentSpace.of_run(run, dataset)
display(viz.traversal_image(space.traversal(steps=7)))
display(viz.interpolation_image(space.interpolation(0, 1, steps=8)))"""),
    ("md", """Each traversal row changes one feature of the digit (slant, thickness, which digit) while
the rest stays; rows the model leaves unused are greyed and change nothing. The interpolation
morphs one test digit into another through codes the prior considers likely (a spherical path
for the Gaussian prior). `vaekit explore RUN_DIR` gives one slider per dimension in the browser."""),
    ("md", """## Beyond the note: richer posteriors and a hierarchy

A diagonal Gaussian q(z | x) leaves a gap wherever the true posterior is correlated or skewed.
`posterior="full-covariance"` and `posterior="iaf"` (an inverse autoregressive flow) are richer
families; `latent_groups` builds a hierarchical VAE with top-down inference. Same data; log
p(x) by importance sampling (k = 200) on the same 100 test digits. Each trains for 10 epochs, to
keep the notebook short."""),
    ("code", """from vaekit.estimate import evaluate

def quick_figures(run):
    result = evaluate(run.model, dataset.test_x[:100], run.pipeline, k=200, seed=0, naive=False).summary()
    return result["log_px"], result["elbo"], result["elbo_gap"]

variants = {}
for name, options in (("diagonal Gaussian", dict()), ("full covariance", dict(posterior="full-covariance")),
                      ("IAF, 2 steps", dict(posterior="iaf", flow_steps=2)),
                      ("hierarchy 2 + 6", dict(latent_groups=[2, 6]))):
    folder = work / name.split()[0]
    variants[name] = load_run(vaekit.train(TrainConfig(**SMALL, epochs=10, latent_dim=8, out=str(folder),
                                                       **options), log=quiet))
print(f"{'model':18s} {'log p(x)':>9s} {'ELBO':>9s} {'gap':>6s}")
for name, r in variants.items():
    print("%-18s %9.2f %9.2f %6.2f" % (name, *quick_figures(r)))"""),
    ("code", """hierarchy = variants["hierarchy 2 + 6"].model
print(type(hierarchy).__name__, [name for name, _ in hierarchy.latent_groups])
display(viz.titled(viz.examples_image(pipeline.display(hierarchy.sample(48, mean=True,
        generator=torch.Generator().manual_seed(0)))), "hierarchy: new digits"))
cooler = hierarchy.sample(48, mean=True, temperature=0.6, generator=torch.Generator().manual_seed(0))
display(viz.titled(viz.examples_image(pipeline.display(cooler)), "the same codes' noise at temperature 0.6"))"""),
    ("md", """The table compares what each family reaches in the same short training: the gap column is
log p(x) − ELBO, the part of the bound the posterior family leaves on the table; richer families
can close some of it, though after 10 epochs on 8x8 digits the differences are small and
noisy (the README's Fashion-MNIST table compares full runs). A gap near zero with a low log p(x),
as a briefly trained hierarchy can show, means little is encoded yet: a posterior that stays
near its prior leaves little gap. The hierarchy's samples come from its
top group down; a lower temperature scales every group's prior noise and gives fewer, more
typical digits."""),
    ("md", """## Sharing a model

Every model saves and loads the way the Hugging Face Hub's mixins do: `config.json`,
`model.safetensors` and a model card `README.md`. A run folder is itself loadable, and
`vaekit push RUN_DIR REPO_ID` uploads it; `from_pretrained("owner/name")` downloads it
(`pip install 'vaekit[hub]'`)."""),
    ("code", """from vaekit.model import LatentModel

saved = hierarchy.save_pretrained(work / "shared-hierarchy")
again = LatentModel.from_pretrained(saved)
same = torch.equal(again.sample(8, mean=True, generator=torch.Generator().manual_seed(1)),
                   hierarchy.sample(8, mean=True, generator=torch.Generator().manual_seed(1)))
print(sorted(p.name for p in saved.iterdir()), "| identical samples after the round trip:", same)
print((run_dir / "README.md").read_text().split("## Training")[0][-400:])"""),
    ("md", """The saved folder holds the configuration as JSON, the weights as safetensors, a sample grid
and the card; the reloaded hierarchy draws exactly the same samples. The run folder's own card
(printed) names its data and what its likelihood scores, and `vaekit evaluate` adds log p(x) to
it."""),
]


def build() -> nbformat.NotebookNode:
    cells = [new_markdown_cell(text) if kind == "md" else new_code_cell(text)
             for kind, text in CELLS]
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def render(notebook: nbformat.NotebookNode) -> None:
    """Write tutorial.ipynb and its HTML rendering."""
    from nbconvert import HTMLExporter

    nbformat.write(notebook, HERE / "tutorial.ipynb")
    body, _ = HTMLExporter().from_notebook_node(notebook)
    (HERE / "tutorial.html").write_text(body, encoding="utf-8")


def main() -> int:
    from nbclient import NotebookClient

    if sys.argv[1:] == ["--text-only"]:  # markdown edited: keep the outputs, render again
        executed = nbformat.read(HERE / "tutorial.ipynb", as_version=4)
        for old, new in zip(executed.cells, build().cells, strict=True):
            if old.cell_type != "markdown" and old.source != new.source:
                raise SystemExit(f"code changed ({new.source.splitlines()[0]!r}): execute again")
            old.source = new.source
        render(executed)
        return 0
    notebook = build()
    started = time.monotonic()
    NotebookClient(notebook, timeout=3000, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    seconds = time.monotonic() - started
    render(notebook)
    print(f"executed in {seconds:.0f} s; wrote {HERE / 'tutorial.ipynb'} and tutorial.html",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
