"""Limits a service publishes in its /v1/info: one flat dict of ints, whatever their nesting in the config."""

from __future__ import annotations

from dataclasses import dataclass, fields


class PublishedLimits:
    """A mixin for frozen dataclasses of limits; nested limits (a service's image limits) are inlined."""

    def as_dict(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out |= value.as_dict() if isinstance(value, PublishedLimits) else {f.name: int(value)}
        return out


@dataclass(frozen=True)
class HeaderLimits(PublishedLimits):
    """What a request's header block may hold, checked before any route runs: the bytes by the HTTP parser (h11,
    which buffers at most this much before it refuses with 400), the count by HeaderLimitMiddleware (431)."""

    max_header_bytes: int = 64 << 10
    max_headers: int = 100
