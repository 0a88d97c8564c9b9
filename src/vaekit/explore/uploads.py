"""Images a user uploads to the explorer, read as the run's raw data: size and format checked
from the header before any pixel is decoded, then centre-cropped and resized."""

import io

import torch
from fastapi import HTTPException

MAX_UPLOAD_BYTES = 4 * 2**20  # an image file; a model of small images needs few of its pixels
MAX_IMAGE_SIDE = 4096  # pixels, checked from the header before decoding (<= 64 MiB as RGBA)
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # the only decoders Pillow may use


def image_to_raw(data: bytes, shape: tuple[int, ...], invert: bool = False) -> torch.Tensor:
    """An uploaded image file as the run's raw data: uint8 (1, C, H, W), centre-cropped to the
    data's aspect ratio and resized. Size and format are checked before any pixel is decoded."""
    import numpy as np
    from PIL import Image

    if not data:
        raise HTTPException(422, "the uploaded file is empty; choose an image file")
    channels, height, width = shape
    try:
        image = Image.open(io.BytesIO(data), formats=list(UPLOAD_FORMATS))  # reads the header
        size = image.size
    except Image.DecompressionBombError:  # the header declares far more pixels than allowed
        raise HTTPException(413, f"the image declares more pixels than the explorer's limit of "
                            f"{MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE}; scale it down") from None
    except Exception:  # Pillow's parsers raise many kinds; all mean "not a readable image"
        raise HTTPException(415, f"the upload is not an image the explorer reads; give a "
                            f"{', '.join(UPLOAD_FORMATS[:-1])} or {UPLOAD_FORMATS[-1]} file") \
            from None
    if max(size) > MAX_IMAGE_SIDE or min(size) < 1:
        raise HTTPException(413, f"the image is {size[0]} x {size[1]} pixels; the explorer "
                            f"accepts 1 to {MAX_IMAGE_SIDE} pixels a side, scale it down")
    try:
        image.load()
        if image.mode.startswith("I") or image.mode == "F":  # 16-bit or float grey levels
            values = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
            image = Image.fromarray(np.clip(values / top * 255, 0, 255).astype(np.uint8), "L")
        image = image.convert("L" if channels == 1 else "RGB")
        w, h = image.size
        if w * height > h * width:  # too wide: keep the centre columns
            keep = max(1, round(h * width / height))
            box = ((w - keep) // 2, 0, (w - keep) // 2 + keep, h)
        else:
            keep = max(1, round(w * height / width))
            box = (0, (h - keep) // 2, w, (h - keep) // 2 + keep)
        image = image.crop(box).resize((width, height), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    except Exception as exc:  # truncated or corrupt pixel data, in any decoder
        raise HTTPException(422, f"the image could not be decoded ({type(exc).__name__}); it "
                            "may be damaged, try another file") from None
    if invert:
        array = 255 - array
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)  # (C, H, W)
    return torch.from_numpy(array.copy())[None]  # (1, C, H, W), writable and contiguous
