"""Pictures: the per-class sample grid and the training curves of the new objectives."""

from __future__ import annotations

import torch

from vaekit.viz import class_rows_image, curves_image


def test_class_rows_image_has_one_labelled_row_per_class():
    images = torch.rand(3 * 4, 3, 10, 12)  # 3 classes x 4 samples, RGB
    image = class_rows_image(images, ["cat", "dog", "long class name"])
    plain = class_rows_image(images, ["a", "b", "c"])
    assert image.height == plain.height  # three rows either way
    assert image.width > plain.width  # the margin fits the longest name
    vectors = class_rows_image(torch.rand(6, 5), ["x", "y"])
    assert vectors.height > 0


def test_curves_add_beta_and_iwae_panels_when_they_vary():
    rows = [{"epoch": e, "train_elbo": -10.0 + e, "test_elbo": -11.0 + e,
             "train_reconstruction": -9.0, "test_reconstruction": -9.5, "train_kl": 1.0,
             "test_kl": 1.5, "beta": min(1.0, e / 3)} for e in (1, 2, 3, 4)]
    with_beta = curves_image(rows)
    constant = curves_image([{**r, "beta": 1.0} for r in rows])
    assert with_beta.height > constant.height
    iwae = curves_image([{**r, "test_iwae": r["test_elbo"] + 1} for r in rows])
    assert iwae.size == with_beta.size


def test_reconstruction_image_labels_originals_inputs_and_reconstructions():
    from vaekit.viz import reconstruction_image

    originals = torch.full((3, 1, 4, 4), 0.5)
    inputs = (originals > 0.4).float()
    two = reconstruction_image(originals, originals * 0.9, columns=3)
    three = reconstruction_image(originals, originals * 0.9, columns=3, inputs=inputs,
                                 input_name="binarised input")
    import numpy as np

    # one more row of the same height (rows of 58 pixels with a 2-pixel border)
    assert two.height == 2 * 58 + 2 and three.height == 3 * 58 + 2
    left = np.asarray(three.convert("L"))[:, :20]
    assert (left < 128).any()  # the row names are drawn at the left
