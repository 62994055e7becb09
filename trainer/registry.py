"""The teacher registry: one YAML file of named, shared teachers (endpoints, domains, expected fingerprint).

Run configs name a teacher (`teachers.math: {teacher: math-tiny}`) instead of copying its URLs, so the people who run
the teachers move or pin one in a single place, and every run that names it follows at its next re-read.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from trainer.config import ConfigError, Digest, RunConfig, _Strict, check_urls


class RegistryTeacher(_Strict):
    urls: list[str] = Field(min_length=1, description="Replicas of this teacher.")
    domains: list[str] = Field(min_length=1, description="Domains this teacher may be routed.")
    fingerprint: Digest | None = Field(
        default=None, description="Expected fingerprint digest (or a prefix of >= 12 hex digits); none = accept the "
                                  "one the endpoint reports (the run records it in teachers.json).")
    api_key_env: str | None = Field(default=None, description="Env var holding the bearer key for these URLs.")
    description: str | None = None

    @field_validator("urls")
    @classmethod
    def _http(cls, urls: list[str]) -> list[str]:
        return check_urls(urls)


class Registry(_Strict):
    teachers: dict[str, RegistryTeacher] = Field(min_length=1, description="name -> teacher")


def load_registry(path: Path) -> Registry:
    """Parse and validate; errors start with `registry:` and name the file and the field."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"registry: no such file {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"registry: {path}: {exc}") from None
    try:
        return Registry.model_validate(tree if tree is not None else {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"registry: {path}: {where}: {err['msg'].removeprefix('Value error, ')}") from None


def resolve_teachers(config: RunConfig) -> None:
    """Fill urls, api_key_env and fingerprint of every `teachers.<domain>.teacher` from the registry, in place."""
    registry = load_registry(config.registry)
    for domain, pool in config.teachers.items():
        if pool.teacher is None:
            continue
        entry = registry.teachers.get(pool.teacher)
        if entry is None:
            raise ConfigError(f"teachers.{domain}.teacher: {pool.teacher!r} is not in the registry {config.registry} "
                              f"(it has: {', '.join(sorted(registry.teachers))})")
        if domain not in entry.domains:
            raise ConfigError(f"teachers.{domain}.teacher: registry teacher {pool.teacher!r} does not serve domain "
                              f"{domain!r} (its domains: {', '.join(entry.domains)})")
        pool.urls, pool.api_key_env, pool.fingerprint = list(entry.urls), entry.api_key_env, entry.fingerprint
