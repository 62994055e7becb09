"""What a teacher refuses in one score item, as one pure check: the teacher raises what it returns, and a trainer masks
the item on it instead of sending it to fail its whole request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from proto.errors import ApiError
from proto.schemas import ScoreItem


class ItemBounds(Protocol):
    """What an item is checked against: a teacher's TeacherInfo, or the ScorerInfo the server builds it from."""

    @property
    def max_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_top_k(self) -> int: ...

    @property
    def image_token_id(self) -> int | None: ...


def score_item_problem(item: ScoreItem, teacher: ItemBounds, where: str = "item") -> ApiError | None:
    """The error `teacher` answers `item` with (its field prefixed by `where`), or None when the item is scorable.

    Checks only the item itself: its request's images and limits are the server's (services/teacher_server/limits.py).
    """
    n = len(item.input_ids)
    if n > teacher.max_length:
        return ApiError(422, "too_long", f"{where}.input_ids has {n} tokens; max length is {teacher.max_length}",
                        f"{where}.input_ids")
    if item.response_start >= n:
        return ApiError(422, "invalid_field", f"{where}.response_start must be < len(input_ids) = {n}",
                        f"{where}.response_start")
    if item.top_k > teacher.max_top_k:
        return ApiError(422, "invalid_field", f"{where}.top_k must be <= {teacher.max_top_k}", f"{where}.top_k")
    image = teacher.image_token_id
    if image is not None and image in item.input_ids[item.response_start :]:
        return ApiError(422, "invalid_token", f"{where}: the response holds an image placeholder (token {image}); "
                        "images belong in the prompt", where)
    if item.candidates is not None and (problem := candidates_problem(item.candidates, n - item.response_start,
                                                                      teacher, f"{where}.candidates")):
        return problem
    return vocab_problem(item.ids_array, teacher.vocab_size, f"{where}.input_ids")


def candidates_problem(rows: Sequence[Sequence[int]], positions: int, teacher: ItemBounds,
                       field: str) -> ApiError | None:
    """Candidates are R rows (one per response position) or 1 shared row, of k distinct in-vocabulary ids each,
    1 <= k <= max_top_k: the tail bucket is the mass outside a row, so a repeated id would be counted twice.
    `rows`: lists, or the (R, k) array a trainer's item keeps (ScoreItem.of_arrays)."""
    if len(rows) not in (1, positions):
        return ApiError(422, "invalid_field", f"{field} has {len(rows)} rows; give one per scored position "
                        f"({positions}) or one shared row", field)
    k = len(rows[0])
    if not 1 <= k <= teacher.max_top_k:
        return ApiError(422, "invalid_field", f"{field}: {k} candidates per position; 1 to {teacher.max_top_k} "
                        "(this teacher's --max-top-k)", field)
    if not isinstance(rows, np.ndarray) and len(set(map(len, rows))) > 1:
        j, row = next((j, row) for j, row in enumerate(rows) if len(row) != k)
        return ApiError(422, "invalid_field", f"{field}[{j}] has {len(row)} ids; every row needs {k}",
                        f"{field}[{j}]")
    ids = np.asarray(rows, dtype=np.int64)
    if (bad := np.argwhere(ids >= teacher.vocab_size)).size:
        r, c = bad[0].tolist()
        return ApiError(422, "invalid_token", f"{field}[{r}][{c}] = {ids[r, c]} is outside [0, "
                        f"{teacher.vocab_size})", f"{field}[{r}][{c}]")
    ordered = np.sort(ids, axis=1)
    if (dup := np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))).size:
        return ApiError(422, "invalid_field", f"{field}[{dup[0]}] repeats an id; candidates must be distinct",
                        f"{field}[{dup[0]}]")
    return None


def vocab_problem(ids: Sequence[int], vocab_size: int, field: str) -> ApiError | None:
    """The first token id outside the model's vocabulary, as the error naming it (`field[j]`), or None."""
    ids = np.asarray(ids, dtype=np.int64)
    bad = np.flatnonzero(ids >= vocab_size)
    if not bad.size:
        return None
    j = int(bad[0])
    return ApiError(422, "invalid_token", f"{field}[{j}] = {ids[j]} is outside [0, {vocab_size})", f"{field}[{j}]")


def distribution_values(item: ScoreItem, vocab_size: int, candidate_scoring: str) -> int:
    """Values an item costs beyond one per position, as a teacher's max_distribution_values counts them: R x vocab
    for a distribution, R x k for candidates (R x vocab where the backend picks them from a full distribution)."""
    per_position = vocab_size if item.distribution else 0
    if item.candidates is not None and len(item.candidates):  # no rows: refused by candidates_problem, not here
        per_position += vocab_size if candidate_scoring == "full-distribution" else len(item.candidates[0])
    return item.response_length * per_position
