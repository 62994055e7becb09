"""What the run config and the teacher registry share: the strict base model, field types, the error type and the
way a validation failure is told (every problem, each with its field)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A teacher fingerprint digest (sha256 hex) or a prefix of at least 12 hex digits, as the teacher logs it.
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{12,64}$")]


def check_urls(urls: list[str]) -> list[str]:
    """http(s) URLs without a trailing slash."""
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"{u!r} is not an http(s) URL")
    return [u.rstrip("/") for u in urls]


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, `field.path: message`, so a file with three mistakes is fixed in one go."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{where}: {msg}" if where else f"{prefix}{msg}")  # cross-field errors name their field
    return "\n".join(lines)
