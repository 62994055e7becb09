"""The teacher registry: one YAML file of named, shared teachers (endpoints, domains, expected fingerprint).

Run configs name a teacher (`teachers.math: {teacher: math-tiny}`) instead of copying its URLs, so the people who run
the teachers move or pin one in a single place, and every run that names it follows at its next re-read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from trainer.config_fields import ConfigError, Digest, Strict, check_urls, validation_message


class RegistryTeacher(Strict):
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


class Registry(Strict):
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
        raise ConfigError(validation_message(exc, prefix=f"registry: {path}: ")) from None


def resolve_teachers(teachers: Mapping[str, Any], path: Path) -> None:
    """Fill urls, api_key_env and fingerprint of every `teachers.<domain>.teacher` pool from the registry at `path`,
    in place."""
    registry = load_registry(path)
    for domain, pool in teachers.items():
        if pool.teacher is None:
            continue
        entry = registry.teachers.get(pool.teacher)
        if entry is None:
            raise ConfigError(f"teachers.{domain}.teacher: {pool.teacher!r} is not in the registry {path} "
                              f"(it has: {', '.join(sorted(registry.teachers))})")
        if domain not in entry.domains:
            raise ConfigError(f"teachers.{domain}.teacher: registry teacher {pool.teacher!r} does not serve domain "
                              f"{domain!r} (its domains: {', '.join(entry.domains)})")
        pool.urls, pool.api_key_env, pool.fingerprint = list(entry.urls), entry.api_key_env, entry.fingerprint
