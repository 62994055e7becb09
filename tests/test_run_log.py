"""The run log survives a crash mid-write: a torn last line is dropped (with a warning) on resume and when read."""

from __future__ import annotations

import json
import logging

import pytest

from trainer.run_log import RunLog, read_log


def write_steps(path, steps: int) -> RunLog:
    run_log = RunLog(path, enabled=True)
    for step in range(steps):
        run_log.write(step, {"loss": 0.5 / (step + 1)})
    return run_log


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    run_log = write_steps(tmp_path, 4)
    with run_log.path.open("a") as f:
        f.write('{"step": 4, "kind": "train", "ti')  # the process died here
    with caplog.at_level(logging.WARNING, logger="uniopd.train"):
        run_log.truncate_after(2)
    assert "half-written last line" in caplog.text
    assert [r["step"] for r in read_log(run_log.path)] == [0, 1, 2]
    run_log.write(3, {"loss": 0.1})  # the resumed run appends after the kept rows
    assert [r["step"] for r in read_log(run_log.path)] == [0, 1, 2, 3]
    run_log.close()


def test_reading_drops_a_torn_last_line(tmp_path):
    run_log = write_steps(tmp_path, 2)
    with run_log.path.open("a") as f:
        f.write('{"step": 2, "kind": "tr')
    assert [r["step"] for r in read_log(run_log.path)] == [0, 1]
    run_log.close()


def test_a_damaged_line_before_the_last_one_raises_naming_it(tmp_path):
    run_log = write_steps(tmp_path, 3)
    lines = run_log.path.read_text().splitlines()
    lines[1] = lines[1][:10]
    run_log.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_log(run_log.path)
    assert json.loads(lines[0])["step"] == 0
    run_log.close()
