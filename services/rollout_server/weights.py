"""Student weight updates: safetensors only (never pickle), checked against the served architecture."""

from __future__ import annotations

import math
from pathlib import Path

from proto.errors import ApiError


def expected_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes in HF checkpoint format, from a weightless (meta-device) copy of the model."""
    import torch
    from transformers import AutoConfig

    from modeling.loading import auto_model_class

    with torch.device("meta"):
        model = auto_model_class(model_dir).from_config(AutoConfig.from_pretrained(model_dir))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(tensors: dict, expected: dict[str, tuple[int, ...]]) -> None:
    if not tensors:
        raise ApiError(422, "invalid_weights", "the payload holds no tensors", "body")
    for name, value in tensors.items():
        _check_name_and_shape(name, tuple(value.shape), expected, name, name)
        if not value.dtype.is_floating_point:
            raise ApiError(422, "invalid_weights", f"tensor {name!r} has dtype {value.dtype}, expected a float", name)
        if not bool(value.isfinite().all()):  # a diverged trainer must not take sampling down with it
            raise ApiError(422, "invalid_weights", f"tensor {name!r} holds NaN or inf", name)


def _check_name_and_shape(name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]], name_field: str,
                          shape_field: str) -> None:
    if name not in expected:
        raise ApiError(422, "invalid_weights", f"tensor {name!r} is not a parameter of the served model", name_field)
    if shape != expected[name]:
        raise ApiError(422, "invalid_weights", f"tensor {name!r} has shape {shape}, expected {expected[name]}",
                       shape_field)


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_declared(names: list[str], dtype_names: list[str], shapes: list[list[int]],
                   expected: dict[str, tuple[int, ...]], field: str) -> int:
    """check_tensors for a weight-transfer round, from what the trainer declares before any data moves; returns the
    round's bytes. `field`: where the lists are in the request."""
    import torch

    seen: set[str] = set()
    size = 0
    for i, (name, dtype, shape) in enumerate(zip(names, dtype_names, shapes, strict=True)):
        if name in seen:
            raise ApiError(422, "invalid_weights", f"tensor {name!r} is named twice", f"{field}.names[{i}]")
        seen.add(name)
        _check_name_and_shape(name, tuple(shape), expected, f"{field}.names[{i}]", f"{field}.shapes[{i}]")
        if dtype not in FLOAT_DTYPES:
            raise ApiError(422, "invalid_weights", f"tensor {name!r} has dtype {dtype!r}, expected one of "
                           f"{', '.join(FLOAT_DTYPES)}", f"{field}.dtype_names[{i}]")
        size += getattr(torch, dtype).itemsize * math.prod(shape)
    return size


def read_safetensors_file(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ApiError(422, "invalid_weights", f"not a valid safetensors payload: {exc}", "body") from None


def tensors_from_path(path: str, root: Path | None) -> dict:
    """A .safetensors file or a directory of them, which must lie under the server's --weights-root."""
    if root is None:
        raise ApiError(400, "unsupported", "loading weights from a path is disabled (start with --weights-root)",
                       "path")
    if "\x00" in path:
        raise ApiError(422, "invalid_field", "path holds a NUL byte", "path")
    root = root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ApiError(422, "invalid_field", "path must lie under the server's weights root", "path")
    files = sorted(f.resolve() for f in target.glob("*.safetensors")) if target.is_dir() else [target]
    if not all(f.is_relative_to(root) for f in files):  # a symlink in an allowed directory pointing out of it
        raise ApiError(422, "invalid_field", "path links to a file outside the server's weights root", "path")
    if not files or not all(f.is_file() and f.suffix == ".safetensors" for f in files):
        raise ApiError(422, "invalid_field", f"no .safetensors file at {path!r}", "path")
    tensors: dict = {}
    for f in files:
        tensors.update(read_safetensors_file(f))
    return tensors
