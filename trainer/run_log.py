"""Per-step metrics to JSONL (always) and TensorBoard (when installed); appends, so a resumed run continues its log."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("uniopd.train")


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to %s only", self.path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows of steps after the checkpoint, which the resumed run is about to redo."""
        if not self.enabled or not self.path.exists():
            return
        keep = [row for row in _rows(self.path) if row["step"] <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))

    def write(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **clean}) + "\n")
        if self._tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def read_log(path: Path, kind: str | None = "train") -> list[dict]:
    return [r for r in _rows(Path(path)) if kind is None or r["kind"] == kind]


def _rows(path: Path) -> list[dict]:
    """The log's rows. A last line that does not parse is what a crash mid-write leaves: dropped, with a warning; a
    bad line anywhere else is damage this code did not cause, and raises."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({line[:80]!r})") from None
            log.warning("%s: dropping a half-written last line (%d bytes): %r", path, len(line), line[:80])
    return rows
