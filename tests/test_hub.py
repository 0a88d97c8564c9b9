"""save_pretrained / from_pretrained / vaekit push (hub.py): the local round trip is exact.

The round trip is checked on what a model computes, not only on its weights: posteriors,
decoder outputs, prior draws and ELBO terms of the reloaded model equal the original's bit for
bit, for the flat VAE, a hierarchy and a conditional model, from a saved folder, a run folder
and a Hub repository id resolved from huggingface_hub's cache (offline).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_vaekit, train_tiny
from vaekit.errors import ConfigError, RunError
from vaekit.hierarchy import HierarchicalVAE
from vaekit.hub import MODEL_FORMAT, files_to_push, from_pretrained, save_pretrained
from vaekit.model import VAE, LatentModel, ModelConfig, build_vae
from vaekit.objectives import elbo_terms
from vaekit.runs import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "runs"


def outputs(model: LatentModel, x: torch.Tensor, y: torch.Tensor | None) -> list[torch.Tensor]:
    """What a model computes from fixed inputs and noise."""
    model.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        code = model.sample_codes(6, generator=torch.Generator().manual_seed(3),
                                  y=None if y is None else y[:6])  # (6, code_dim)
        decoded = model.decode(code, None if y is None else y[:6]).mean
        samples = model.sample(6, y=None if y is None else y[:6], mean=True,
                               generator=torch.Generator().manual_seed(4))
        torch.manual_seed(7)
        terms = elbo_terms(model, x, y=y)
        point = model.point_code(x, y)
    return [code, decoded, samples, terms.reconstruction, terms.kl, point]


def assert_same_outputs(a: LatentModel, b: LatentModel, x, y=None) -> None:
    for first, second in zip(outputs(a, x, y), outputs(b, x, y), strict=True):
        assert first.dtype == second.dtype and torch.equal(first, second)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


MODELS = {
    "flat": (ModelConfig(data_shape=(1, 8, 8), latent_dim=4, hidden=[32]), VAE),
    "iaf": (ModelConfig(data_shape=(1, 8, 8), latent_dim=4, hidden=[32], posterior="iaf",
                        flow_steps=2), VAE),
    "hierarchy": (ModelConfig(data_shape=(1, 8, 8), latent_dim=6, hidden=[32],
                              latent_groups=[2, 4]), HierarchicalVAE),
    "conditional": (ModelConfig(data_shape=(1, 8, 8), latent_dim=4, hidden=[32], num_classes=10),
                    VAE),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_save_then_load_gives_bit_identical_outputs(name, tmp_path):
    config, cls = MODELS[name]
    torch.manual_seed(1)
    model = build_vae(config)
    for p in model.parameters():  # away from the initialisation, which a rebuild would repeat
        p.data.add_(torch.randn_like(p) * 0.1)
    folder = model.save_pretrained(tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "model.safetensors", "samples.png"]
    assert json.loads((folder / "config.json").read_text())["format"] == MODEL_FORMAT
    torch.manual_seed(99)  # a different global state: loading must not depend on it
    loaded = cls.from_pretrained(folder)
    assert type(loaded) is cls and not loaded.training
    x = torch.bernoulli(torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    y = torch.arange(10) if config.num_classes else None
    assert_same_outputs(model, loaded, x, y)
    # LatentModel loads every kind; a mismatched class is refused in one line
    assert type(LatentModel.from_pretrained(folder)) is cls
    if cls is HierarchicalVAE:
        with pytest.raises(ConfigError, match="holds a HierarchicalVAE, not a VAE"):
            VAE.from_pretrained(folder)


def test_a_run_folder_is_loadable_and_its_model_saves_exactly(tmp_path):
    run_dir = train_tiny(tmp_path / "run", epochs=1, conditional=True)
    run = load_run(run_dir)
    x = run.pipeline.fixed(torch.zeros(8, 1, 8, 8, dtype=torch.uint8) + 200, 0)
    y = torch.arange(8)
    from_run = VAE.from_pretrained(run_dir)
    assert_same_outputs(run.model, from_run, x, y)
    saved = save_pretrained(run.model, tmp_path / "saved", label_names=run.label_names)
    document = json.loads((saved / "config.json").read_text())
    assert document["label_names"] == run.label_names
    assert_same_outputs(run.model, VAE.from_pretrained(saved), x, y)
    with pytest.raises(RunError, match="is a training run"):
        save_pretrained(run.model, run_dir)


@pytest.mark.parametrize("writer", ["bb52941", "0f6a429"])
def test_old_runs_without_a_model_card_load(writer, tmp_path):
    assert not (FIXTURES / writer / "README.md").exists()
    model = LatentModel.from_pretrained(FIXTURES / writer)
    assert_same_outputs(load_run(FIXTURES / writer).model, model,
                        torch.bernoulli(torch.full((4, 1, 8, 8), 0.3)))


def fake_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
    """huggingface_hub's cache layout, as snapshot_download leaves it after a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_a_repo_id_resolves_through_huggingface_hub(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(2)
    model = build_vae(MODELS["hierarchy"][0])
    fake_hub_cache(tmp_path / "hub", "someone/vaekit-tiny", model.save_pretrained(tmp_path / "m"))
    loaded = LatentModel.from_pretrained("someone/vaekit-tiny", cache_dir=tmp_path / "hub",
                                         local_files_only=True)
    assert_same_outputs(model, loaded, torch.rand(5, 1, 8, 8))
    with pytest.raises(RunError, match="cannot download it from the Hugging Face Hub") as info:
        from_pretrained("someone/absent", cache_dir=tmp_path / "hub", local_files_only=True)
    assert "\n" not in str(info.value)


def test_without_huggingface_hub_a_repo_id_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if absent
    with pytest.raises(ConfigError, match=r"pip install 'vaekit\[hub\]'") as info:
        LatentModel.from_pretrained("someone/vaekit-digits")
    assert "\n" not in str(info.value)


def test_bad_sources_and_bad_saved_configs_are_refused(tmp_path):
    with pytest.raises(RunError, match="not a Hub repository id"):
        LatentModel.from_pretrained(tmp_path / "missing" / "deeper")
    with pytest.raises(ConfigError, match="put together by hand"):
        hand_made = build_vae(MODELS["flat"][0])
        hand_made.model_config = None
        hand_made.save_pretrained(tmp_path / "x")
    folder = build_vae(MODELS["flat"][0]).save_pretrained(tmp_path / "m")
    document = json.loads((folder / "config.json").read_text())
    for change, message in (({"hidden": [10**9]}, "weights do not fit|has shape"),
                            ({"latent_dim": 0}, "--latent-dim must be at least 1"),
                            ({"colour": "blue"}, "unknown model option 'colour'"),
                            ({"data_shape": [0]}, "data_shape")):
        (folder / "config.json").write_text(json.dumps(
            {**document, "model": {**document["model"], **change}}))
        with pytest.raises((ConfigError, RunError), match=message) as info:
            LatentModel.from_pretrained(folder)
        assert "\n" not in str(info.value)


def test_push_sends_the_shareable_files_and_refuses_bad_input(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "planted.png").symlink_to(run_dir / "samples.png")
    pushed = {str(p) for p in files_to_push(run_dir)}
    assert {"config.json", "model.safetensors", "README.md", "metrics.jsonl",
            "samples.png"} <= pushed
    assert not any(p.startswith(("checkpoints", ".lock")) for p in pushed)
    assert "planted.png" not in pushed
    result = run_vaekit("push", run_dir, "not a repo id")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a Hub repository id" in result.stderr.strip()
    result = run_vaekit("push", tmp_path, "someone/vaekit-digits")
    assert result.returncode == 2 and "not a vaekit run or saved model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
