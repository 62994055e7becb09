"""Loading a model directory the same way on every side: its transformers auto class, in a dtype named in a config
or on a command line."""

from __future__ import annotations

from pathlib import Path

from modeling.multimodal import is_multimodal

DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model may be loaded in, by name


def torch_dtype(name: str):
    """The torch dtype of a name in DTYPES (torch spells them the same)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def auto_model_class(model_dir: str | Path):
    """The transformers auto class that loads this model with its LM head: image-text-to-text for a VLM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(model_dir) else AutoModelForCausalLM


def from_pretrained(model_dir: str | Path, dtype: str = "float32"):
    """The model with its LM head, in the named dtype, where transformers puts it (the CPU)."""
    return auto_model_class(model_dir).from_pretrained(model_dir, dtype=torch_dtype(dtype))
