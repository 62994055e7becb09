"""Images from untrusted callers, decoded safely: PNG and JPEG only, bounded bytes, pixels checked before decoding.

A decompression bomb is a small file whose header declares an enormous image. PIL opens lazily, so the size is read
from the header and refused before a single pixel is allocated.

Nothing here touches process-wide state (no `Image.MAX_IMAGE_PIXELS`, no `ImageFile.LOAD_TRUNCATED_IMAGES`, no
warning filters: `warnings.catch_warnings` swaps the global filter list and is not thread-safe before Python 3.14),
so decoding is safe from any number of server worker threads. PIL is imported lazily so that `ImageLimits` (used
by the CLI and the limits modules) does not need Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proto.errors import ApiError
from services.common.limits import PublishedLimits

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class ImageLimits(PublishedLimits):
    """Per-request image bounds; published by the services so callers can size their requests."""

    max_images: int = 16  # per request
    max_image_bytes: int = 4 << 20  # encoded size of one image
    max_image_pixels: int = 4096 * 4096  # width x height of one image, from its header, before decoding
    max_side: int = 8192  # either side, from its header
    max_request_pixels: int = 64 << 20  # all images of one request together (~192 MB decoded as RGB)


def decode_images(blobs: Sequence[bytes], limits: ImageLimits, field: str = "images") -> list[Image]:
    """Every image decoded as RGB, in order. The count, then every header, then the pixels of all images together
    are checked before any pixel is decoded: many small-file, large-canvas images would otherwise pass one by one."""
    if len(blobs) > limits.max_images:
        raise ApiError(413, "too_many_images", f"{field}: {len(blobs)} images exceeds the limit of "
                       f"{limits.max_images}", field)
    opened: list[Image] = []
    try:
        for i, blob in enumerate(blobs):
            opened.append(_open(blob, limits, f"{field}[{i}]"))
        total = sum(im.size[0] * im.size[1] for im in opened)
        if total > limits.max_request_pixels:
            raise ApiError(413, "image_too_large", f"{field}: {total} pixels in all exceeds the per-request limit "
                           f"of {limits.max_request_pixels}", field)
        return [_decode(im, f"{field}[{i}]") for i, im in enumerate(opened)]
    finally:
        for im in opened:
            im.close()


def _open(data: bytes, limits: ImageLimits, field: str) -> Image:
    """The image opened lazily (header read, no pixels) and checked against the per-image limits."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(422, "invalid_image", f"{field}: empty image", field)
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, "image_too_large", f"{field}: {len(data)} bytes exceeds the limit of "
                       f"{limits.max_image_bytes}", field)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data, field) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: if filters say error
        raise ApiError(413, "image_too_large", f"{field}: {exc}", field) from None
    except Exception as exc:  # a header the plugin half-parsed: ValueError, EOFError, zlib.error...
        raise ApiError(422, "invalid_image", f"{field}: malformed image ({exc})", field) from None
    try:
        _check_header(image, limits, field)
    except ApiError:
        image.close()
        raise
    return image


def _check_header(image: Image, limits: ImageLimits, field: str) -> None:
    from PIL import Image

    width, height = image.size
    # Above PIL's own threshold it only warns and would still decode; refuse that too.
    pil_limit = Image.MAX_IMAGE_PIXELS
    max_pixels = min(limits.max_image_pixels, pil_limit) if pil_limit else limits.max_image_pixels
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"{field}: {width}x{height} pixels exceeds the limit of "
                       f"{max_pixels}", field)
    if max(width, height) > limits.max_side:
        raise ApiError(413, "image_too_large", f"{field}: {width}x{height} pixels exceeds the limit of "
                       f"{limits.max_side} per side", field)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:  # APNG, or a multi-picture JPEG (MPO): which frame the model sees would be a guess
        raise ApiError(422, "invalid_image", f"{field}: animated images are not accepted ({frames} frames)", field)


def _decode(image: Image, field: str) -> Image:
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError, zlib.error...
        raise ApiError(422, "invalid_image", f"{field}: cannot decode {image.format} ({exc})", field) from None


def _unidentified(data: bytes, field: str) -> ApiError:
    """Why PIL could not open the data as PNG or JPEG, from its magic bytes alone (no other parser is run)."""
    from PIL import Image

    Image.init()  # register every plugin, so every format's magic-bytes check is known
    prefix = data[:16]  # what Image.open hands the plugins' accept checks
    recognised = [fmt for fmt, (_, accept) in list(Image.OPEN.items()) if accept and accept(prefix)]
    if not recognised:
        return ApiError(422, "invalid_image", f"{field}: not a PNG or JPEG image", field)
    ours = [fmt for fmt in recognised if fmt in IMAGE_FORMATS]
    if ours:  # a PNG or JPEG signature with a header PIL could not parse
        return ApiError(422, "invalid_image", f"{field}: malformed {ours[0]} header", field)
    return ApiError(422, "unsupported_image_format", f"{field}: {recognised[0]} images are not accepted; "
                    f"send {' or '.join(IMAGE_FORMATS)}", field)
