"""services.common.images: untrusted PNG/JPEG bytes decoded safely, every refusal an ApiError naming the field."""

from __future__ import annotations

import io
import random
import resource
import struct
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile

from proto.errors import ApiError
from services.common.images import IMAGE_FORMATS, ImageLimits, decode_images

LIMITS = ImageLimits()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def noise(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def gray1_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A hand-made 1-bit grayscale PNG of zeros; `rows` < height leaves the IDAT short of what the header declares."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = b"\0" * ((1 + (width + 7) // 8) * (height if rows is None else rows))  # filter byte + packed bits per row
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def decode_one(data: bytes, limits: ImageLimits = LIMITS) -> Image.Image:
    """One image, decoded as a request of that one image is (its field is images[0])."""
    return decode_images([data], limits)[0]


def refusal(data: bytes, limits: ImageLimits = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_one(data, limits)
    return info.value


def assert_refused(err: ApiError, status: int, code: str, field: str = "images[0]") -> None:
    assert (err.status, err.code, err.field) == (status, code, field), err.message
    assert err.message.startswith(f"{field}: "), err.message


# ---- what is accepted -------------------------------------------------------------------------------------------


def test_png_round_trip_preserves_every_pixel():
    pixels = noise()
    image = decode_one(encode(Image.fromarray(pixels), "PNG"))
    assert (image.mode, image.size) == ("RGB", (48, 32))
    assert image.getpixel((0, 0)) == tuple(pixels[0, 0])
    assert image.getpixel((47, 31)) == tuple(pixels[31, 47])
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_jpeg_round_trip_is_close():
    pixels = np.full((32, 48, 3), (200, 40, 90), dtype=np.uint8)
    image = decode_one(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert (image.mode, image.size) == ("RGB", (48, 32))
    assert np.abs(np.asarray(image).astype(int) - pixels).max() <= 4


@pytest.mark.parametrize(
    ("source", "fmt", "expected"),
    [
        (Image.new("RGBA", (6, 4), (10, 20, 30, 0)), "PNG", (10, 20, 30)),  # alpha dropped, colour kept
        (Image.new("L", (6, 4), 77), "PNG", (77, 77, 77)),
        (Image.new("LA", (6, 4), (77, 128)), "PNG", (77, 77, 77)),
        (Image.new("1", (6, 4), 1), "PNG", (255, 255, 255)),
        (Image.new("I;16", (6, 4), 200), "PNG", (200, 200, 200)),
        (Image.new("RGB", (6, 4), (1, 2, 3)).quantize(colors=4), "PNG", (1, 2, 3)),  # P mode
        (Image.new("CMYK", (6, 4), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
    ],
    ids=["RGBA", "L", "LA", "1", "I;16", "P", "CMYK-JPEG"],
)
def test_every_mode_becomes_rgb(source, fmt, expected):
    image = decode_one(encode(source, fmt))
    assert (image.mode, image.size) == ("RGB", (6, 4))
    assert np.abs(np.asarray(image).astype(int) - expected).max() <= 2


def test_decode_images_keeps_order_and_accepts_the_limits_exactly():
    blobs = [encode(Image.new("RGB", (4, 3), (i, 0, 0)), "PNG") for i in range(3)]
    exact = ImageLimits(max_images=3, max_image_bytes=max(map(len, blobs)), max_image_pixels=12, max_side=4)
    images = decode_images(blobs, exact)
    assert [im.getpixel((0, 0)) for im in images] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    assert decode_images([], exact) == []


def test_hand_made_png_helper_is_a_valid_png():
    image = decode_one(gray1_png(300, 200))
    assert (image.mode, image.size) == ("RGB", (300, 200))
    assert not np.asarray(image).any()


def test_concurrent_decoding_from_threads():
    arrays = [noise(16, 16, seed) for seed in range(32)]
    blobs = [encode(Image.fromarray(a), "PNG") for a in arrays]
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(decode_one, blobs))
    for array, image in zip(arrays, images, strict=True):
        np.testing.assert_array_equal(np.asarray(image), array)


# ---- published limits ----------------------------------------------------------------------------------


def test_limits_as_dict():
    assert ImageLimits(max_images=2).as_dict() == {
        "max_images": 2, "max_image_bytes": 4 << 20, "max_image_pixels": 4096 * 4096, "max_side": 8192,
        "max_request_pixels": 64 << 20,
    }
    assert IMAGE_FORMATS == ("PNG", "JPEG")


# ---- counts and encoded size --------------------------------------------------------------------------------------


def test_too_many_images_is_refused_before_decoding_any():
    with pytest.raises(ApiError) as info:
        decode_images([b"not an image"] * 3, ImageLimits(max_images=2))  # garbage never reached
    assert_refused(info.value, 413, "too_many_images", "images")
    assert "3" in info.value.message and "2" in info.value.message


def test_oversized_second_image_names_its_index():
    small = encode(Image.new("RGB", (2, 2)), "PNG")
    big = encode(Image.fromarray(noise(64, 64)), "PNG")
    limits = ImageLimits(max_image_bytes=len(small) + 10)
    with pytest.raises(ApiError) as info:
        decode_images([small, big], limits)
    assert_refused(info.value, 413, "image_too_large", "images[1]")
    assert str(len(big)) in info.value.message


def test_total_pixels_of_a_request_are_refused_before_decoding_any(no_decoding):
    # each canvas passes the per-image limits and compresses to a few KB: only their sum gives them away
    canvases = [gray1_png(2048, 2048) for _ in range(5)]
    limits = ImageLimits(max_request_pixels=4 * 2048 * 2048)
    with pytest.raises(ApiError) as info:
        decode_images(canvases, limits)
    assert_refused(info.value, 413, "image_too_large", "images")
    assert f"{5 * 2048 * 2048} pixels in all" in info.value.message


def test_total_pixels_at_the_limit_are_decoded():
    blobs = [encode(Image.new("RGB", (4, 3)), "PNG")] * 2
    assert len(decode_images(blobs, ImageLimits(max_request_pixels=24))) == 2
    with pytest.raises(ApiError):
        decode_images(blobs, ImageLimits(max_request_pixels=23))


def test_field_prefix_is_used_for_nested_paths():
    with pytest.raises(ApiError) as info:
        decode_images([encode(Image.new("RGB", (2, 2)), "PNG"), b""], LIMITS, field="messages[3].images")
    assert_refused(info.value, 422, "invalid_image", "messages[3].images[1]")


# ---- decompression bombs: refused from the header, before any pixel is allocated ----------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding (ImageFile.load) fails the test: refusals must come from the header alone."""

    def load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_complete_bomb_is_refused_from_its_header(no_decoding):
    bomb = gray1_png(6000, 6000)  # a valid, complete PNG: 4.5 MB of zero rows, 36 Mpixel, a few KB encoded
    assert len(bomb) < 8 << 10
    assert Image.open(io.BytesIO(bomb)).size == (6000, 6000)  # PIL itself opens it: below its own threshold
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    err = refusal(bomb)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 32 << 10  # 36 MB+ if it were decoded
    assert_refused(err, 413, "image_too_large")
    assert "6000x6000 pixels exceeds the limit of 16777216" in err.message


def test_huge_declared_size_with_truncated_idat_is_refused(no_decoding):
    bomb = gray1_png(30000, 30000, rows=10)  # only 10 rows of data; the header alone must condemn it
    assert len(bomb) < 4 << 10
    start = time.perf_counter()
    err = refusal(bomb)
    assert time.perf_counter() - start < 0.5
    assert_refused(err, 413, "image_too_large")  # PIL's DecompressionBombError, raised inside Image.open


def test_size_in_pils_warning_band_is_refused_without_touching_warning_filters(no_decoding):
    # 10000x10000 is above Image.MAX_IMAGE_PIXELS (PIL warns) but below 2x it (PIL would not raise).
    bomb = gray1_png(10000, 10000, rows=1)
    filters, pil_limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):
        assert_refused(refusal(bomb, ImageLimits(max_image_pixels=10**9, max_side=10**5)), 413, "image_too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a process that escalates the warning
        assert_refused(refusal(bomb), 413, "image_too_large")
    assert warnings.filters == filters
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # read, never changed
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_one_side_too_long_is_refused(no_decoding):
    err = refusal(gray1_png(9000, 1))  # 9000 pixels in all, far under the pixel limit
    assert_refused(err, 413, "image_too_large")
    assert "9000x1" in err.message and "8192 per side" in err.message


def test_lowered_pixel_limit_is_enforced(no_decoding):
    image = encode(Image.new("RGB", (20, 20)), "PNG")
    err = refusal(image, ImageLimits(max_image_pixels=100))
    assert_refused(err, 413, "image_too_large")
    assert "20x20 pixels exceeds the limit of 100" in err.message


def test_jpeg_size_is_checked_from_its_header_too(no_decoding):
    err = refusal(encode(Image.new("RGB", (40, 30)), "JPEG"), ImageLimits(max_side=32))
    assert_refused(err, 413, "image_too_large")
    assert "40x30" in err.message


# ---- malformed data -----------------------------------------------------------------------------------------------


def test_truncated_png_is_invalid():
    png = encode(Image.fromarray(noise(64, 64)), "PNG")
    idat = png.index(b"IDAT")
    err = refusal(png[: idat + 4 + 1000])  # the header is intact; the data stops partway through IDAT
    assert_refused(err, 422, "invalid_image")
    assert "truncated" in err.message


def test_corrupt_png_data_is_invalid():
    png = bytearray(encode(Image.fromarray(noise(64, 64)), "PNG"))
    idat = png.index(b"IDAT")
    png[idat + 100 : idat + 140] = bytes(40)
    assert_refused(refusal(bytes(png)), 422, "invalid_image")


def test_truncated_jpeg_is_invalid():
    jpeg = encode(Image.fromarray(noise(64, 64)), "JPEG")
    assert_refused(refusal(jpeg[: len(jpeg) // 2]), 422, "invalid_image")


def test_png_signature_with_a_broken_header_is_invalid():
    assert_refused(refusal(PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR\x00\x01"), 422, "invalid_image")


@pytest.mark.parametrize(
    "data", [b"", b"hello, I am not an image", random.Random(0).randbytes(4096)], ids=["empty", "text", "random"]
)
def test_not_an_image_is_invalid(data):
    assert_refused(refusal(data), 422, "invalid_image")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF"])
def test_other_formats_are_unsupported(fmt):
    err = refusal(encode(Image.fromarray(noise()), fmt))
    assert_refused(err, 422, "unsupported_image_format")
    assert fmt in err.message


def test_animated_png_is_refused():
    first = Image.fromarray(noise(seed=1))
    apng = encode(first, "PNG", save_all=True, append_images=[Image.fromarray(noise(seed=2))])
    assert Image.open(io.BytesIO(apng)).n_frames == 2
    err = refusal(apng)
    assert_refused(err, 422, "invalid_image")
    assert "animated" in err.message


def test_multi_picture_jpeg_is_refused():
    mpo = encode(Image.fromarray(noise(seed=1)), "MPO", save_all=True, append_images=[Image.fromarray(noise(seed=2))])
    assert_refused(refusal(mpo), 422, "invalid_image")
