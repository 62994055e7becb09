"""Teachers swapped by config during a run, between steps.

The trainer's main process calls `TeacherSwapper.at_step_boundary(step)` before every step. When the run's config
file or its teacher registry file changed (mtime, size or inode), or a SIGHUP asked for it, the config is loaded again
(with the same `--set` overrides). Only the teachers section (`teachers`, `registry`, `allow_teacher_change`) is
applied live; any other changed field is logged as needing a restart and ignored.

A domain whose endpoints changed is handshaken on the new endpoints first (info, tokenizer, expected fingerprint). A
teacher with another fingerprint than the current one is refused unless `allow_teacher_change: true`. On success the
router's pool is replaced, and since cache keys carry the pool's fingerprint, the old teacher's cached scores can
never be returned for the new one. A refused or failed swap keeps the old pool, logs an error and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import httpx

from proto.errors import ApiError
from trainer.config import ConfigError, RunConfig, TeacherPoolConfig, load_config
from trainer.teacher_router import Endpoint, RouterError, TeacherRouter

log = logging.getLogger("uniopd.train")

LIVE_FIELDS = frozenset({"teachers", "registry", "allow_teacher_change"})
RECORD_FILE = "teachers.json"

Stamp = tuple[int, int, int] | None


def file_stamp(path: Path) -> Stamp:
    """What a write changes: mtime, size, inode (an atomic replace); None for a missing file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two nested dicts."""
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _target(pool: TeacherPoolConfig) -> tuple:
    """What the router depends on: a change of any of these is a swap (a renamed registry entry is not)."""
    return tuple(pool.urls or ()), pool.api_key_env, pool.fingerprint


def _describe(pool: TeacherPoolConfig) -> str:
    urls = ", ".join(pool.urls or ())
    return f"teacher {pool.teacher!r} ({urls})" if pool.teacher else urls


class TeacherSwapper:
    """Watches a run's config and registry files and applies teacher changes at step boundaries (main process)."""

    def __init__(self, config: RunConfig, enabled: bool = True) -> None:
        self.config = config
        self.enabled = enabled and config.source is not None
        self.swaps = 0
        self.refused = 0
        self.reloads = 0
        self.reload_errors = 0
        self._router: TeacherRouter | None = None
        self._student_tokenizer = ""
        self._stamps: dict[Path, Stamp] | None = None  # None: re-read once at the first boundary (edits at start-up)
        self._hup = False
        self._previous_handler = None
        self._warned: list[str] = []

    # --- wiring -------------------------------------------------------------------------------------------------

    def attach(self, router: TeacherRouter, student_tokenizer: str, step: int) -> None:
        """After the start-up handshake: the pools to swap from; records the teachers the run starts with."""
        self._router, self._student_tokenizer = router, student_tokenizer
        if self.enabled:
            for domain, pool in self.config.teachers.items():
                digest = router.info(domain).fingerprint.digest
                pin = "expected" if pool.fingerprint else "not pinned; pin it with fingerprint: <digest>"
                log.info("teachers: domain %r on %s, fingerprint %s (%s)", domain, _describe(pool), digest, pin)
            self._record(step)

    def install_sighup(self) -> None:
        """SIGHUP asks for a re-read at the next step boundary (instead of terminating the process)."""
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, *_) -> None:
        self._hup = True

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    # --- the step boundary --------------------------------------------------------------------------------------

    async def at_step_boundary(self, step: int) -> None:
        """Re-read the config if a file changed or SIGHUP asked for it, and apply the teacher changes.

        Never raises for a bad file or a bad teacher: those are logged, counted, and the current teachers stay."""
        if not self.enabled or self._router is None:
            return
        reason = self._reload_reason()
        if reason is None:
            return
        source = self.config.source
        stamps = self._current_stamps()
        log.log(logging.DEBUG if reason == "first check" else logging.INFO,
                "teachers: re-reading %s (%s) before step %d", source.path, reason, step + 1)
        self.reloads += reason != "first check"
        try:
            new = load_config(source.path, list(source.overrides))
        except ConfigError as exc:
            self._stamps = stamps  # retried when the file changes again (or on SIGHUP)
            self.reload_errors += 1
            log.error("teachers: re-reading %s failed, keeping the current teachers: %s", source.path, exc)
            return
        self._stamps = {**stamps, **({new.registry: file_stamp(new.registry)} if new.registry else {})}
        self._warn_restart_only(new)
        self.config.registry, self.config.allow_teacher_change = new.registry, new.allow_teacher_change
        changed = False
        for domain in sorted(set(self.config.teachers) & set(new.teachers)):
            old_pool, new_pool = self.config.teachers[domain], new.teachers[domain]
            if _target(old_pool) == _target(new_pool):
                old_pool.teacher = new_pool.teacher
            else:
                changed |= await self._swap(domain, new_pool, step)
        if changed:
            self._record(step)

    def _watched(self) -> list[Path]:
        return [self.config.source.path, *([self.config.registry] if self.config.registry else [])]

    def _current_stamps(self) -> dict[Path, Stamp]:
        return {path: file_stamp(path) for path in self._watched()}

    def _reload_reason(self) -> str | None:
        if self._hup:
            self._hup = False
            return "SIGHUP"
        if self._stamps is None:
            return "first check"
        current = self._current_stamps()
        return "file changed" if any(self._stamps.get(p) != s for p, s in current.items()) else None

    def _warn_restart_only(self, new: RunConfig) -> None:
        """Changes outside the teachers section need a restart: say which, once per distinct set."""
        fields = changed_fields(self.config.model_dump(mode="json", exclude=LIVE_FIELDS),
                                new.model_dump(mode="json", exclude=LIVE_FIELDS))
        domains = sorted(set(self.config.teachers) ^ set(new.teachers))
        fields += [f"teachers.{d}" for d in domains]  # data was loaded for the start-up domains
        if fields and fields != self._warned:
            log.warning("teachers: %s changed in %s; only the teachers section applies during a run (and not added or "
                        "removed domains), so these take effect after a restart (ignored now)",
                        ", ".join(fields), self.config.source.path)
        self._warned = fields

    async def _swap(self, domain: str, pool: TeacherPoolConfig, step: int) -> bool:
        """Handshake the new endpoints, check the fingerprint policy, replace the pool. True when swapped."""
        endpoints = [Endpoint(u, self.config.env_secret(pool.api_key_env)) for u in pool.urls]
        old = self._router.info(domain)
        try:
            info = await self._router.probe(domain, endpoints, self._student_tokenizer,
                                            self.config.allow_tokenizer_mismatch, pool.fingerprint)
        except (RouterError, ApiError, httpx.HTTPError, ValueError) as exc:
            return self._refuse(domain, pool, step, f"the new endpoints failed the handshake: {exc}")
        if (why := self.config.signal_shortfall(domain, pool, info)) is not None:
            return self._refuse(domain, pool, step, why)
        before, after = old.fingerprint.digest, info.fingerprint.digest
        if after != before and not self.config.allow_teacher_change:
            return self._refuse(domain, pool, step, f"it is a different teacher ({old.model} {before[:12]} -> "
                                                    f"{info.model} {after[:12]}); set allow_teacher_change: true "
                                                    f"to accept it")
        await self._router.replace_pool(domain, endpoints, info)
        self.config.teachers[domain] = pool
        self.swaps += 1
        change = "same teacher" if after == before else f"teacher changed from {old.model} {before[:12]}"
        log.info("teachers: domain %r swapped to %s before step %d, fingerprint %s (%s)", domain, _describe(pool),
                 step + 1, after[:12], change)
        return True

    def _refuse(self, domain: str, pool: TeacherPoolConfig, step: int, why: str) -> bool:
        self.refused += 1
        log.error("teachers: swap of domain %r to %s refused before step %d: %s; keeping %s", domain,
                  _describe(pool), step + 1, why, ", ".join(self._router.urls(domain)))
        return False

    # --- what the run shows ---------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Cumulative (since the process started): applied swaps, refused swaps, re-reads, failed re-reads."""
        return {"teachers/swaps": self.swaps, "teachers/swap_refused": self.refused,
                "teachers/reloads": self.reloads, "teachers/reload_errors": self.reload_errors}

    def _record(self, step: int) -> None:
        """output_dir/teachers.json: each domain's current endpoints and the full fingerprint they reported."""
        teachers = {}
        for domain, pool in self.config.teachers.items():
            info = self._router.info(domain)
            teachers[domain] = {"teacher": pool.teacher, "urls": self._router.urls(domain),
                                "fingerprint": info.fingerprint.digest, "expected": pool.fingerprint,
                                "model": info.model}
        path = self.config.output_dir / RECORD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "teachers": teachers}, indent=2) + "\n")
        os.replace(tmp, path)
