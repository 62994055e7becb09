"""What a request body may hold, checked before it is parsed: parsing is what costs (10^6 tiny JSON items took 7 s
and 1 GB of one process), so a body is measured by what no spelling changes.

JSON: every object and array opens with a literal `{` or `[`, and every value after a container's first follows a
literal `,` (escapes exist only inside strings), so counting those bytes bounds the objects, arrays and values a parse
would build, whatever the keys are spelled like. The counts can only over-count (the same bytes inside strings). On
routes whose bodies carry free text (`BodyBudget.text`) a body over budget is counted again with its strings removed,
but only when it has few enough strings to be within budget at all: a regex pass over millions of tiny strings costs
seconds, more than the parse it would spare. msgpack: containers declare their lengths, so the item count is read
from the array header before anything is unpacked, and the unpacker stops as soon as the lists or maps it has built
pass the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgpack

from proto.errors import ApiError

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: 9 MB of one string in 27 ms


@dataclass(frozen=True)
class BodyBudget:
    """Upper bounds for one request: objects (each an item or a few options), arrays and values (one per token id,
    candidate id or option). `items` is the published item limit, for the message; `field` names the request's list
    of items (the field a refusal names)."""

    objects: int
    arrays: int
    values: int
    items: int
    field: str = "items"
    text: bool = False  # strings may hold braces, brackets and commas (chat messages): recount without them

    def refuse(self, what: str, count: int, limit: int) -> ApiError:
        code = "batch_too_large" if what in ("objects", "items") else "request_too_large"
        return ApiError(413, code, f"the body holds up to {count} JSON {what} (counted before parsing); a request "
                        f"within this server's limits ({self.items} items) holds at most {limit}", self.field)


def json_counts(body: bytes) -> tuple[int, int, int]:
    """(objects, arrays, values) a parse of `body` could build at most."""
    objects, arrays = body.count(b"{"), body.count(b"[")
    return objects, arrays, 1 + body.count(b",") + objects + arrays


def check_json(body: bytes, budget: BodyBudget) -> None:
    """413 naming `budget.field` when the body could hold more than the budget; costs milliseconds per MB."""
    over = _over(json_counts(body), budget)
    # each string is a key or a value: a body with more than two per value is over budget whatever they hold
    if over and budget.text and body.count(b'"') <= 4 * (budget.values + budget.objects):
        over = _over(json_counts(_STRING.sub(b'""', body)), budget)
    if over:
        raise budget.refuse(*over)


def _over(counts: tuple[int, int, int], budget: BodyBudget) -> tuple[str, int, int] | None:
    """The first of (objects, arrays, values) over its bound, with its count and bound; None when all are within."""
    for what, count, limit in zip(("objects", "arrays", "values"), counts,
                                  (budget.objects, budget.arrays, budget.values), strict=True):
        if count > limit:
            return what, count, limit
    return None


def declared_items(body: bytes, key: str = "items") -> int | None:
    """The length a msgpack body's top-level map declares for `key`'s array, read without unpacking the items; None
    where the body is not such a map (the full unpack then says what is wrong)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == key:
                return unpacker.read_array_header()
            unpacker.skip()
    except Exception:  # msgpack raises several unrelated types for corrupt or other-shaped input
        return None
    return None


def unpack_msgpack(body: bytes, budget: BodyBudget) -> object:
    """msgpack.unpackb that refuses (413) before building more arrays, maps or array elements than the budget."""
    n = declared_items(body, budget.field)
    if n is not None and n > budget.items:
        raise budget.refuse("items", n, budget.items)
    built = {"objects": 0, "arrays": 0, "values": 0}

    def count(kind: str, size: int) -> None:
        built[kind] += 1
        built["values"] += size
        if built[kind] > getattr(budget, kind) or built["values"] > budget.values:
            raise _OverBudget(kind)

    def on_list(items: list) -> list:
        count("arrays", len(items))
        return items

    def on_map(pairs: dict) -> dict:
        count("objects", len(pairs))
        return pairs

    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, list_hook=on_list, object_hook=on_map,
                               max_array_len=budget.values, max_map_len=budget.values)
    except _OverBudget as exc:
        what = exc.args[0] if built[exc.args[0]] > getattr(budget, exc.args[0]) else "values"
        raise budget.refuse(what, built[what], getattr(budget, what)) from None
    except ValueError as exc:
        if "exceeds max_" not in str(exc):  # msgpack's refusal of one container longer than the budget
            raise ApiError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
        raise ApiError(413, "request_too_large", f"{exc}: more values than a request within this server's limits "
                       f"({budget.items} items) holds ({budget.values})", budget.field) from None
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise ApiError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None


class _OverBudget(Exception):
    pass
