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
    which buffers at most this much before it refuses with 400), the count by HeaderLimitMiddleware (431). And how
    long a request may take to arrive: its header block from when the connection is ready for it (else the
    connection is closed: `serving.TimedH11Protocol`), its body from when the route starts reading it (else 408), so
    a client that sends slowly holds a connection for a bounded time."""

    max_header_bytes: int = 64 << 10
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
