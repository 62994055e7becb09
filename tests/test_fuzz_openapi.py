"""Fuzz every route from the server's own OpenAPI schema (schemathesis): no 5xx, and responses match the schema.

`positive_data_acceptance` is left out: JSON Schema cannot say `response_start < len(input_ids)` or "set
prompt_logprobs or echo", so schema-valid bodies can still be rightly refused with 4xx.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from uniopd.launch import start_rollout

pytestmark = pytest.mark.e2e  # real server processes fuzzed over HTTP


# A body over a per-request limit (more items than the schema's maxItems) is refused with 413, as the API documents;
# schemathesis's default list of acceptable rejections of invalid data leaves 413 out.
CONFIG = """[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""


def fuzz(server, workdir: Path, headers: tuple[str, ...] = ()) -> None:
    (workdir / "schemathesis.toml").write_text(CONFIG)  # read from the working directory
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a dev dependency"
    cmd = [st, "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks",
           "positive_data_acceptance", "--max-examples", "40", "--seed", "1", "--no-color"]
    for h in headers:
        cmd += ["--header", h]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=workdir)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "Traceback" not in server.log()
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_teacher_schema_fuzz_finds_no_server_errors(teacher, tmp_path):
    fuzz(teacher, tmp_path)


def test_rollout_schema_fuzz_finds_no_server_errors(tiny_model, tmp_path):
    (tmp_path / "admin").write_text("fuzz-admin")
    args = ["--admin-keys", str(tmp_path / "admin"), "--weights-root", str(tmp_path), "--max-n", "4"]
    with start_rollout(tiny_model, "hf", args, log_dir=tmp_path) as server:
        fuzz(server, tmp_path, ("Authorization: Bearer fuzz-admin",))
