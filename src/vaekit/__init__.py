"""vaekit: variational autoencoders as three distributions, two networks and one ELBO.

    from vaekit import ModelConfig, build_vae, elbo_terms
    model = build_vae(ModelConfig(data_shape=(1, 28, 28)))
    terms = elbo_terms(model, x)            # per-example reconstruction and KL, in nats
    x_new = model.sample(16, mean=True)     # z ~ p(z), then E[x | z]

Names are imported on first use, so `vaekit --help` starts without loading torch.
"""

import importlib

__version__ = "0.2.0.dev0"

_EXPORTS = {
    "VAE": "model", "ModelConfig": "model", "build_vae": "model", "LatentModel": "model",
    "HierarchicalVAE": "hierarchy", "from_pretrained": "hub", "save_pretrained": "hub",
    "ELBOTerms": "objectives", "elbo_terms": "objectives",
    "TrainConfig": "config", "train": "train", "load_run": "runs", "load_dataset": "data",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaekit' has no attribute {name!r}")
