"""The image side of a multimodal model, shared by the teacher, the rollout server and the trainer.

On the wire a prompt holds one placeholder token per image (the student's own tokenization). A model expands each
placeholder into its image tokens (Idefics3: `<fake><global-img><image>*16<fake>`; LLaVA: `<image>*576`), so the
expanded sequence is longer than the sent one; response positions are therefore counted from the end of the sequence,
where expansion cannot shift them.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Images one sequence may show: vLLM sizes its engine for this many per prompt (requests may carry more in all).
MAX_IMAGES_PER_SEQUENCE = 16
# Keys of a processor's output that are token-level, not image tensors for the model.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


def is_multimodal(model_dir: str | Path) -> bool:
    """A model with a vision tower: its config names one."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "vision_config" in config


def text_config(config: Any) -> Any:
    """The language model's config (a multimodal config nests it; a text config is its own)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class Vision:
    """A processor that turns (prompt ids with placeholders, images) into the model's input ids and image tensors."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.placeholder = self.processor.image_token
        self.placeholder_id: int = self.processor.tokenizer.convert_tokens_to_ids(self.placeholder)
        self.fingerprint = processor_fingerprint(self.processor)
        self.image_token_ids = self._image_token_ids()
        self._positions: dict[tuple[int, int], int] = {}

    def image_positions(self, size: tuple[int, int]) -> int:
        """Positions one image of this (width, height) takes once expanded. The processor decides (resizing, tiling),
        so it is asked, once per size: a few thousand distinct sizes at most, as the pixel limits bound them."""
        if size not in self._positions:
            from PIL import Image

            if len(self._positions) >= 4096:
                self._positions.clear()
            self._positions[size] = len(self.expand([[self.placeholder_id]], [[Image.new("RGB", size)]])[0][0])
        return self._positions[size]

    def _image_token_ids(self) -> frozenset[int]:
        """The tokens an image expands into: a sampler must never emit them, as they mean nothing without pixels."""
        from PIL import Image

        ids, _ = self.expand([[self.placeholder_id]], [[Image.new("RGB", (32, 32))]])
        return frozenset(ids[0]) | {self.placeholder_id}

    def expand(self, rows: Sequence[Sequence[int]], images: Sequence[Sequence[Any]]) -> tuple[list[list[int]], dict]:
        """Rows with every placeholder replaced by its image's tokens, and the image tensors for those rows.

        Images are consumed in row-major placeholder order, which is the order the model merges image features in,
        so rows with different numbers of images batch together. One processor call covers the whole batch.
        """
        flat = [img for row in images for img in row]
        if not flat:
            return [list(r) for r in rows], {}
        enc = self.processor(text=[self.placeholder] * len(flat), images=[[img] for img in flat],
                             add_special_tokens=False, padding=True, return_tensors="pt")
        expansions = iter([ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"],
                                                                         strict=True)])
        out = []
        for row in rows:
            expanded: list[int] = []
            for tok in row:
                if tok == self.placeholder_id:
                    expanded += next(expansions)
                else:
                    expanded.append(tok)
            out.append(expanded)
        return out, {k: v for k, v in enc.items() if k not in _TEXT_KEYS}


def processor_fingerprint(processor: Any) -> str:
    """sha256 of the image processor's settings and image sequence length: what decides the image tokens."""
    settings = {"image_processor": processor.image_processor.to_dict(),
                "image_seq_len": getattr(processor, "image_seq_len", None), "image_token": processor.image_token}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def on_model(tensors: dict, model: Any) -> dict:
    """Image tensors on the model's device, floating ones in its dtype (pixel masks keep theirs)."""
    weight = next(model.parameters())  # also right for a wrapped (DDP) model, which has no .device
    return {k: v.to(weight.device, weight.dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}


def open_image(data: bytes) -> Any:
    """A trusted local image (the trainer's own dataset) as RGB; network input goes through services.common.images,
    which bounds it before decoding."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
