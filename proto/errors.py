"""The one error shape every uniopd service returns: {"error": {"code", "message", "field"}}."""

from __future__ import annotations

from proto.schemas import ErrorBody, ErrorDetail


class ApiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and, where it applies, the offending field."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorBody(error=ErrorDetail(code=self.code, message=self.message, field=self.field)).model_dump()


_TYPE_TAGS = {"list", "dict", "int", "str", "bool", "float", "bytes", "none"}


def _is_type_tag(part: str) -> bool:
    """Union members appear in pydantic locations as tags like `list[int]` or `Model`; they are not fields."""
    return part[:1].isupper() or "[" in part or part.split("-")[0] in _TYPE_TAGS


def field_path(loc: tuple) -> str:
    """Render a pydantic error location as `items[3].input_ids[7]`."""
    out = ""
    for part in loc:
        if isinstance(part, str) and _is_type_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
