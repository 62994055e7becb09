"""Optional bearer API keys, loaded from a file and/or an env var, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from proto.errors import ApiError

API_KEYS_ENV = "UNIOPD_API_KEYS"
ADMIN_KEYS_ENV = "UNIOPD_ADMIN_KEYS"


def load_api_keys(path: str | Path | None, env: str = API_KEYS_ENV) -> list[str]:
    """One key per line in the file (blank lines and `#` comments ignored), plus comma-separated keys in the env."""
    keys = []
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return keys


class ApiKeyChecker:
    """Compares digests, so neither the key length nor the position of the first differing byte leaks in timing."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def check(self, token: str | None) -> None:
        if not token:
            raise ApiError(401, "unauthorized", "missing bearer API key", "Authorization",
                           {"WWW-Authenticate": "Bearer"})
        given = hashlib.sha256(token.encode()).digest()
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(given, digest)
        if not ok:
            raise ApiError(401, "unauthorized", "invalid API key", "Authorization", {"WWW-Authenticate": "Bearer"})
