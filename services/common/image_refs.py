"""Request checks of images against the served model: whether it takes images at all, and each sequence's image
references against its placeholders, which is what the backends rely on to pair tokens and images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modeling.multimodal import MAX_IMAGES_PER_SEQUENCE
from proto.errors import ApiError

ImagePositions = Callable[[tuple[int, int]], int]  # (width, height) -> positions the image takes once expanded


def check_takes_images(count: int, image_token_id: int | None, field: str) -> None:
    """A text-only model (no image placeholder) refuses any image, named by `field`."""
    if count and image_token_id is None:
        raise ApiError(422, "images_unsupported", f"{field}: this model is text-only and takes no images", field)


def check_image_refs(prompt: Sequence[int], refs: Sequence[int], n_images: int, image_token_id: int | None,
                     where: str, refs_field: str) -> None:
    """One sequence's image references: within the request's images, one per placeholder in its prompt."""
    check_takes_images(len(refs), image_token_id, refs_field)
    if image_token_id is None:
        return
    if len(refs) > MAX_IMAGES_PER_SEQUENCE:
        raise ApiError(413, "too_many_images", f"{refs_field}: {len(refs)} images in one sequence; limit is "
                       f"{MAX_IMAGES_PER_SEQUENCE}", refs_field)
    for j, r in enumerate(refs):
        if r >= n_images:
            raise ApiError(422, "invalid_field", f"{refs_field}[{j}] = {r}, but the request has {n_images} images",
                           f"{refs_field}[{j}]")
    placeholders = sum(1 for t in prompt if t == image_token_id)
    if placeholders != len(refs):
        raise ApiError(422, "image_mismatch", f"{where}: the prompt has {placeholders} image placeholders (token "
                       f"{image_token_id}) but {len(refs)} images are referenced", refs_field)


def expanded_lengths(lengths: Sequence[int], images: Sequence[Sequence], positions: ImagePositions, limit: int,
                     field: str, reserve: int = 0) -> list[int]:
    """Each sequence's length with its images expanded, which is what the model runs and what `limit` bounds (the
    sent length counts one placeholder per image); `reserve` positions stay free for generated tokens."""
    out = []
    for i, (n, shown) in enumerate(zip(lengths, images, strict=True)):
        expanded = n + sum(positions(img.size) - 1 for img in shown)
        if expanded + reserve > limit:
            more = f" and max_tokens {reserve}" if reserve else ""
            raise ApiError(422, "too_long", f"{field}[{i}] has {n} tokens, {expanded} with its {len(shown)} images "
                           f"expanded{more}; max length is {limit}", f"{field}[{i}]")
        out.append(expanded)
    return out
