"""Transparency: images with alpha are composited on --background, the choice is part of the
cache key, one line says what was done, and --background none keeps the alpha-dropping decode
of earlier runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaekit.config import TrainConfig, parse_background
from vaekit.errors import ConfigError
from vaekit.image_decode import Transform, decode
from vaekit.image_folder import cache_images, list_image_folder


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))


STORED = (10, 200, 30)  # the RGB a file stores under its transparent pixels


def write_rgba(folder: Path, n: int = 3) -> Path:
    """n 6 x 6 RGBA icons: a red opaque left half, a fully transparent right half storing
    STORED, and one column at half alpha."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.zeros((6, 6, 4), dtype=np.uint8)
        pixels[:, :3] = (255, 0, 0, 255)
        pixels[:, 3] = (0, 0, 255, 128)  # half-transparent blue
        pixels[:, 4:] = (*STORED, 0)
        Image.fromarray(pixels, "RGBA").save(folder / f"{i}.png")
    return folder


def open_cache(folder: Path, background):
    files, _, _ = list_image_folder(folder)
    lines: list[str] = []
    cache = cache_images(folder, files, None, None, background=background, log=lines.append)
    return cache.images(mapped=False), lines


def test_transparent_pixels_take_the_background(tmp_path):
    folder = write_rgba(tmp_path / "icons")
    white, lines = open_cache(folder, (255, 255, 255))
    assert white.shape == (3, 3, 6, 6)
    assert (white[:, :, :, 4:] == 255).all()  # transparent: the background, not STORED
    assert (white[0, :, :, 0] == np.array([[255], [0], [0]])).all()  # opaque red kept
    # half alpha: the blend 128/255 * blue + 127/255 * white, to a level
    assert np.abs(white[0, :, 0, 3].astype(int) - [127, 127, 255]).max() <= 1
    assert lines[-1] == f"{folder}: 3 of 3 images have transparency: composited on white " \
        "(--background)"
    grey_bg, lines = open_cache(folder, (128, 128, 128))
    assert (grey_bg[:, :, :, 4:] == 128).all() and "composited on 128,128,128" in lines[-1]


def test_background_none_drops_alpha_as_before_and_says_so(tmp_path):
    folder = write_rgba(tmp_path / "icons")
    dropped, lines = open_cache(folder, None)
    assert (dropped[:, :, :, 4:].transpose(0, 2, 3, 1) == STORED).all()
    assert "alpha dropped (--background none)" in lines[-1]
    # the decode of runs before --background: the same pixels as a decode without it
    files, _, _ = list_image_folder(folder)
    assert (decode(Path(files[0]), Transform(3, 6, 6)) == dropped[0]).all()


def test_opaque_images_say_nothing_and_grey_alpha_is_composited(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(folder / "b.png")
    images, lines = open_cache(folder, (255, 255, 255))
    assert lines == [] and (images[0] == 7).all()
    grey = tmp_path / "grey"
    grey.mkdir()
    for name in ("a", "b"):
        pixels = np.zeros((4, 4, 2), np.uint8)  # black, transparent on the right half
        pixels[:, :2, 1] = 255
        Image.fromarray(pixels, "LA").save(grey / f"{name}.png")
    images, lines = open_cache(grey, (255, 255, 255))
    assert images.shape == (2, 1, 4, 4)
    assert (images[:, 0, :, :2] == 0).all() and (images[:, 0, :, 2:] == 255).all()


def test_the_background_is_part_of_the_cache_key(tmp_path):
    folder = write_rgba(tmp_path / "icons")
    white, _ = open_cache(folder, (255, 255, 255))
    black, _ = open_cache(folder, (0, 0, 0))
    assert (white[:, :, :, 4:] == 255).all() and (black[:, :, :, 4:] == 0).all()
    again, _ = open_cache(folder, (255, 255, 255))
    assert (again == white).all()


def test_background_option_values():
    assert parse_background("white") == (255, 255, 255)
    assert parse_background(" Black ") == (0, 0, 0)
    assert parse_background("1,2,3") == (1, 2, 3)
    assert parse_background("none") is None
    for bad in ("grey", "1,2", "1,2,256", "-1,0,0", "a,b,c"):
        with pytest.raises(ConfigError, match="--background .* is not a colour"):
            parse_background(bad)
    assert TrainConfig().background == "white"
    # runs written before the option dropped alpha: they are read with none
    stored = {k: v for k, v in TrainConfig(
        epochs=1, batch_size=8, lr=1e-3, lr_decay=1.0, validation_fraction=0.0,
        patience=0).to_dict().items() if k != "background"}
    config, filled = TrainConfig.from_stored(stored, where="config.json", written_by="0")
    assert config.background == "none" and filled["background"] == "none"
