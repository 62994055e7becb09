"""Limits a service publishes in its /v1/info: one flat dict of ints, whatever their nesting in the config."""

from __future__ import annotations

from dataclasses import fields


class PublishedLimits:
    """A mixin for frozen dataclasses of limits; nested limits (a service's image limits) are inlined."""

    def as_dict(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out |= value.as_dict() if isinstance(value, PublishedLimits) else {f.name: int(value)}
        return out
