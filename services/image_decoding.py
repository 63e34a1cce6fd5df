"""A request's image (base64 PNG | JPEG | raw uint8) -> [H, W, 3] uint8 RGB. Size and channels are
checked before pixels are decoded; every bad input is a 422 APIError naming image.data or image.shape."""

import base64
import binascii
import io

import numpy as np

from services.http_errors import APIError
from services.http_schemas import MIN_IMAGE_SIDE, ImageIn


def decode_image(img: ImageIn, max_side: int) -> np.ndarray:
    """Base64 PNG/JPEG/raw -> [H, W, 3] uint8, with size and channel checks before pixel decoding."""
    try:
        data = base64.b64decode(img.data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad_image(f"not valid base64 ({e})", code="invalid_base64") from None
    if img.format == "raw":
        h, w, c = img.shape
        _check_side(h, w, max_side, "image.shape")
        if c != 3:
            raise _bad_image(f"{c} channels; 3 (RGB) are required", "image.shape")
        if len(data) != h * w * 3:
            raise _bad_image(f"{len(data)} bytes do not match shape {img.shape} ({h * w * 3} uint8 bytes expected)")
        return np.frombuffer(data, np.uint8).reshape(h, w, 3)
    from PIL import Image, UnidentifiedImageError

    fmt = {"png": "PNG", "jpeg": "JPEG"}[img.format]
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            w, h = im.size  # from the header: a decompression bomb is refused before decoding
            _check_side(h, w, max_side, "image.data")
            if im.mode != "RGB":
                raise _bad_image(f"a 3-channel 8-bit RGB image is required, got mode {im.mode!r} "
                                 f"({len(im.getbands())} channel(s))")
            im.load()
            return np.asarray(im, dtype=np.uint8).copy()
    except APIError:
        raise
    except UnidentifiedImageError:
        raise _bad_image(f"not a {fmt} image") from None
    except Exception as e:  # truncated or corrupt data: the client's bytes, never a server fault
        raise _bad_image(f"corrupt {fmt} image ({type(e).__name__}: {e})") from None


def _check_side(h: int, w: int, max_side: int, field: str) -> None:
    if not (MIN_IMAGE_SIDE <= h <= max_side and MIN_IMAGE_SIDE <= w <= max_side):
        raise _bad_image(f"image is {h}x{w} (HxW); each side must be {MIN_IMAGE_SIDE}..{max_side} pixels", field,
                         "image_too_large" if max(h, w) > max_side else "image_too_small")


def _bad_image(message: str, field: str = "image.data", code: str = "invalid_image") -> APIError:
    return APIError(422, code, f"{field}: {message}", field)
