"""Bearer API keys grouped into teams: the keys file, constant-time lookups, and a store that reloads the file.

Two file formats. Plain: one key per line (blank lines and `#` comments ignored); its keys belong to the team
`default`, with no limits. Team (YAML, first entry `teams:`): named teams, each with its keys and optional quotas:

    teams:
      alpha: {keys: [key-a1], tokens_per_minute: 200000, max_concurrent: 4, weight: 2}
      beta:  {keys: [key-b1]}          # no limits given = unlimited

Comma-separated keys in `$UNIOPD_API_KEYS` join the team `default` in either format.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, StringConstraints, ValidationError, model_validator

from proto.errors import ApiError

log = logging.getLogger("uniopd.auth")

API_KEYS_ENV = "UNIOPD_API_KEYS"
ADMIN_KEYS_ENV = "UNIOPD_ADMIN_KEYS"
METRICS_KEYS_ENV = "UNIOPD_METRICS_KEYS"
DEFAULT_TEAM = "default"

TeamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Key = Annotated[str, StringConstraints(min_length=1, pattern=r"^\S+$")]


class TeamSpec(BaseModel):
    """One team in the keys file; a limit left out is unlimited."""

    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[Key] = Field(default_factory=list, description="Bearer keys; at least one, unless unauthenticated.")
    unauthenticated: bool = Field(default=False, description="Callers that send no Authorization header are this "
                                                            "team (clients that cannot send a key); at most one team.")
    tokens_per_minute: PositiveInt | None = Field(default=None, description="Response tokens scored per minute.")
    max_concurrent: PositiveInt | None = Field(default=None, description="Scoring requests in flight at once.")
    weight: PositiveInt = Field(default=1, description="Share of the scorer under contention, relative to others.")


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    teams: dict[TeamName, TeamSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _who_is_admitted(self) -> KeysFile:
        open_teams = [name for name, spec in self.teams.items() if spec.unauthenticated]
        if len(open_teams) > 1:
            raise ValueError(f"teams.{open_teams[1]}.unauthenticated: teams {open_teams} are all unauthenticated; "
                             "at most one team can be")
        for name, spec in self.teams.items():
            if not spec.keys and not spec.unauthenticated:
                raise ValueError(f"teams.{name}.keys: no keys (give at least one, or make the team unauthenticated)")
        return self


@dataclass(frozen=True)
class Team:
    """A team's name and limits, as the quota accounting and the scheduler see it (never its keys)."""

    name: str
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    weight: int = 1
    unauthenticated: bool = False  # callers without an Authorization header are this team


class KeysFileError(ValueError):
    """The keys file or env cannot be used; the message names the file and the field."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyTable:
    """Keys → teams. Compares sha256 digests against every key, so neither the key length nor the position of the
    first differing byte nor which team matched leaks in timing."""

    def __init__(self, teams: dict[Team, list[str]]) -> None:
        self._entries = [(_digest(k), team) for team, keys in teams.items() for k in keys]
        self.teams = list(teams)
        self.unauthenticated = next((t for t in teams if t.unauthenticated), None)

    def __bool__(self) -> bool:
        """Auth is on when there is a team (a team file may admit keyless callers as its only team)."""
        return bool(self.teams)

    @classmethod
    def plain(cls, keys: Sequence[str]) -> KeyTable:
        return cls({Team(DEFAULT_TEAM): list(keys)} if keys else {})

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str | None) -> Team:
        """A key's team. `None` (no Authorization header at all) is the unauthenticated team where the file names
        one; an empty, malformed or wrong key never is."""
        if token is None and self.unauthenticated is not None:
            return self.unauthenticated
        if not token:
            raise ApiError(401, "unauthorized", "missing bearer API key", "Authorization",
                           {"WWW-Authenticate": "Bearer"})
        given = _digest(token)
        found = None
        for digest, team in self._entries:
            if hmac.compare_digest(given, digest):
                found = team
        if found is None:
            raise ApiError(401, "unauthorized", "invalid API key", "Authorization", {"WWW-Authenticate": "Bearer"})
        return found


def _where(loc: tuple) -> str:
    """`teams.alpha.keys[0]` from a pydantic location (team names are kept as written, whatever their case)."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal mapping keys; a team named twice would silently lose keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # names are strings; the base class reports unhashable keys
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate entry {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _team_file(path: Path, text: str) -> dict[Team, list[str]]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:  # its line and problem, not PyYAML's excerpt of the file (it would show keys)
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise KeysFileError(f"{path}: not valid YAML: {where}{getattr(exc, 'problem', None) or exc}") from None
    try:
        parsed = KeysFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise KeysFileError(f"{path}: {_where(err['loc']) or 'file'}: {err['msg']}") from None
    teams, owner = {}, {}
    for name, spec in parsed.teams.items():
        for i, key in enumerate(spec.keys):
            if key in owner:
                raise KeysFileError(f"{path}: teams.{name}.keys[{i}]: duplicate key, already a key of team "
                                    f"{owner[key]!r}")
            owner[key] = name
        teams[Team(name, spec.tokens_per_minute, spec.max_concurrent, spec.weight, spec.unauthenticated)] = \
            list(spec.keys)
    return teams


def _plain_file(path: Path, lines: list[str]) -> dict[Team, list[str]]:
    keys = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line.split()) > 1:
            raise KeysFileError(f"{path}: line {n}: a key cannot contain whitespace (a team file starts with "
                                "`teams:`)")
        keys.append(line)
    return {Team(DEFAULT_TEAM): keys} if keys else {}


def read_keys_file(path: str | Path) -> dict[Team, list[str]]:
    """Teams and their keys from either format; a file whose first entry is `teams:` is the team format."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path}: cannot read: {exc}") from None
    lines = text.splitlines()
    first = next((s for s in map(str.strip, lines) if s and not s.startswith("#")), "")
    return _team_file(path, text) if first.startswith("teams:") else _plain_file(path, lines)


def load_key_table(path: str | Path | None, env: str = API_KEYS_ENV) -> KeyTable:
    """The file's teams plus the env's keys (team `default`); a key may belong to one team only."""
    teams = read_keys_file(path) if path else {}
    owner = {k: team.name for team, keys in teams.items() for k in keys}
    extra = _env_keys(env)
    for key in extra:
        if owner.get(key, DEFAULT_TEAM) != DEFAULT_TEAM:
            raise KeysFileError(f"${env}: a key is also a key of team {owner[key]!r} in {path}")
    if extra:
        default = next((t for t in teams if t.name == DEFAULT_TEAM), Team(DEFAULT_TEAM))
        teams[default] = list(dict.fromkeys([*teams.get(default, []), *extra]))
    return KeyTable(teams)


def load_api_keys(path: str | Path | None, env: str = API_KEYS_ENV) -> list[str]:
    """Every key of the file (either format) and the env, for servers that check keys but keep no quotas."""
    teams = read_keys_file(path) if path else {}
    return [k for keys in teams.values() for k in keys] + _env_keys(env)


def _env_keys(env: str) -> list[str]:
    return [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]


class KeyStore:
    """The current key table. The keys file is reloaded when it changes (its mtime, size or inode; looked at, on
    request, at most every `interval` seconds) and on `reload()` (SIGHUP). A file that fails to load, or has no
    keys left, keeps the previous table: a typo locks no one out. Removed keys stop working at the next check."""

    def __init__(self, table: KeyTable, path: str | Path | None = None, env: str = API_KEYS_ENV,
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.path = Path(path) if path else None
        self._env, self._interval, self._clock = env, interval, clock
        self._checked = clock()
        self._signature = self._stat()

    @classmethod
    def from_file(cls, path: str | Path | None, env: str = API_KEYS_ENV, **kw) -> KeyStore:
        """Raises KeysFileError, so a bad file fails at startup."""
        return cls(load_key_table(path, env), path, env, **kw)

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> KeyTable:
        if self.path is not None and self._clock() - self._checked >= self._interval:
            self._checked = self._clock()
            signature = self._stat()
            if signature != self._signature:
                self._signature = signature
                self.reload()
        return self.table

    def reload(self) -> bool:
        """Load the file again; on failure log why and keep the keys in use."""
        try:
            table = load_key_table(self.path, self._env)
        except KeysFileError as exc:
            log.error("keys file not reloaded, keeping the previous keys: %s", exc)
            return False
        if not table:
            log.error("keys file not reloaded, keeping the previous keys: %s has no keys", self.path)
            return False
        self.table = table
        log.info("keys reloaded: %d team(s), %d key(s)", len(table.teams), len(table))
        return True
