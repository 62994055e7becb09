"""API keys and request limits on a real teacher process (transformers backend; these pieces are backend-agnostic)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import httpx
import numpy as np
import pytest

from proto.codec import encode_score_request
from proto.schemas import MSGPACK
from tests.conftest import BACKENDS, random_items
from uniopd.launch import start_teacher

pytestmark = pytest.mark.e2e  # a real teacher process per fixture

FILE_KEY = "team-a-0123456789"
ENV_KEY = "team-b-abcdef"


@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# team a\n{FILE_KEY}\n\n")
    with start_teacher(tiny_model, "hf", ["--api-keys", str(keys)], env={"UNIOPD_API_KEYS": ENV_KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def limited(tiny_model):
    args = ["--max-queue-items", "8", "--max-batch-items", "8", "--batch-wait-ms", "1500", "--max-body-bytes",
            "20000", "--max-request-tokens", "300", "--max-header-bytes", "4096", "--max-headers", "20",
            "--header-timeout-s", "2", "--body-timeout-s", "2"]
    with start_teacher(tiny_model, "hf", args) as server:
        yield server


BODY = {"items": [{"input_ids": [1, 2, 3, 4], "response_start": 2}]}


@pytest.mark.parametrize("path", ["/v1/score", "/generate", "/v1/completions"])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {FILE_KEY}", f"Bearer {FILE_KEY}x"])
def test_scoring_routes_refuse_without_a_valid_key(guarded, path, header):
    headers = {"Authorization": header} if header else {}
    resp = httpx.post(guarded.url + path, json=BODY, headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized" and resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", [FILE_KEY, ENV_KEY])
def test_keys_from_file_and_env_are_accepted(guarded, key):
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(guarded.url + "/v1/score", json=BODY, headers=headers).status_code == 200
    assert httpx.get(guarded.url + "/v1/info", headers=headers).status_code == 200


def test_probes_need_no_key(guarded):
    assert httpx.get(guarded.url + "/v1/info").status_code == 401
    for path in ("/healthz", "/readyz"):
        assert httpx.get(guarded.url + path).status_code == 200
    for headers in ({}, {"Authorization": f"Bearer {FILE_KEY}"}):  # keys and no --metrics-keys: /metrics is closed
        assert httpx.get(guarded.url + "/metrics", headers=headers).status_code == 403


def test_openapi_declares_bearer_auth(guarded):
    spec = httpx.get(guarded.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/score"]["post"]["security"] == [{"HTTPBearer": []}]


def test_declared_body_over_limit(limited):
    resp = httpx.post(limited.url + "/v1/score", content=b"x" * 20001, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"


def test_streamed_body_over_limit(limited):
    def chunks():
        for _ in range(30):
            yield b" " * 1000

    resp = httpx.post(limited.url + "/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"


def test_header_block_limits(limited):
    """Header bytes are refused by the HTTP parser before anything is buffered past the limit (400, connection
    closed), header fields past the count by the app before any route (431); neither harms the next request."""
    url = limited.url + "/v1/score"
    many = {f"x-extra-{i}": "1" for i in range(25)}
    resp = httpx.post(url, json=BODY, headers=many)
    assert resp.status_code == 431 and resp.json()["error"]["code"] == "too_many_headers"
    assert "limit is 20" in resp.json()["error"]["message"] and resp.json()["error"]["field"] == "headers"
    resp = httpx.post(url, json=BODY, headers={"x-big": "a" * 8192})  # arrives whole: measured by the app
    assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large"
    port = int(limited.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:  # still arriving past the limit: the parser refuses
        raw.settimeout(30)
        sent, reply = 0, b""
        try:
            raw.sendall(b"POST /v1/score HTTP/1.1\r\nhost: x\r\n")
            while sent < 64 << 10:  # never ends its header block
                raw.sendall(b"x-slow: " + b"a" * 1024 + b"\r\n")
                sent += 1034
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection mid-header
        with contextlib.suppress(ConnectionResetError):
            reply = raw.recv(64)
        assert sent < 64 << 10 or reply.startswith(b"HTTP/1.1 400"), (sent, reply)
        assert not reply.startswith(b"HTTP/1.1 2")
    assert httpx.get(limited.url + "/healthz").status_code == 200
    assert httpx.post(url, json=BODY, headers={"x-fits": "a" * 2048, **dict(list(many.items())[:10])}
                      ).status_code == 200
    assert httpx.get(limited.url + "/v1/info").json()["limits"]["max_headers"] == 20


def trickle(port: int, head: bytes, piece: bytes, seconds: float = 12.0) -> tuple[float, bytes]:
    """Send `head`, then `piece` every 0.25 s for up to `seconds`; returns when the server answered or closed the
    connection: (the seconds that took, what it answered)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.settimeout(0.25)
        reply = b""
        try:
            raw.sendall(head)
            while time.monotonic() - start < seconds:
                try:
                    chunk = raw.recv(4096)
                except TimeoutError:
                    raw.sendall(piece)
                    continue
                if not chunk:
                    break
                reply += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        return time.monotonic() - start, reply


@pytest.mark.parametrize("head", [
    b"", b"POST /v1/score HTTP/1.1\r\nhost: x\r\n", b"GET /healthz HTTP/1.1\r\nhost: x\r\n",
], ids=["nothing-sent", "score-headers", "healthz-headers"])
def test_a_header_block_that_trickles_in_is_cut_off(limited, head):
    """uvicorn's keep-alive timer restarts at every byte and a new connection has none: a client sending a header
    line every 0.25 s held its connection forever. With --header-timeout-s 2 the server closes it."""
    port = int(limited.url.rsplit(":", 1)[1])
    took, reply = trickle(port, head, b"x-slow: 1\r\n")
    assert took < 12 and reply == b"", (took, reply)
    assert httpx.get(limited.url + "/healthz").status_code == 200


def test_a_second_request_on_a_kept_alive_connection_is_held_to_the_header_deadline_too(limited):
    port = int(limited.url.rsplit(":", 1)[1])
    first = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    took, reply = trickle(port, first + b"GET /healthz HTTP/1.1\r\n", b"x-slow: 1\r\n")
    assert took < 12 and reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1, (took, reply)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_trickles_in_gets_408(limited, framing):
    port = int(limited.url.rsplit(":", 1)[1])
    if framing == "content-length":
        head, piece = b"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-length: 10000\r\n\r\n{", b" "
    else:
        head = b"POST /v1/score HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\n{\r\n"
        piece = b"1\r\n \r\n"
    took, reply = trickle(port, head, piece)  # answered, then the connection closed: the client can send no more
    assert took < 12 and reply.startswith(b"HTTP/1.1 408"), (took, reply)
    assert b"body_timeout" in reply and b"--body-timeout-s" in reply
    assert httpx.post(limited.url + "/v1/score", json=BODY).status_code == 200


def test_too_many_items_and_tokens(limited):
    many = {"items": [{"input_ids": [1, 2], "response_start": 1}] * 9}
    resp = httpx.post(limited.url + "/v1/score", json=many)
    assert resp.status_code == 413 and resp.json()["error"] == {
        "code": "batch_too_large", "message": "9 items; limit is 8", "field": "items"}
    long = {"items": [{"input_ids": [1] * 200, "response_start": 1}] * 2}
    resp = httpx.post(limited.url + "/v1/score", json=long)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


def test_full_queue_answers_429_and_recovers(limited):
    big = encode_score_request(random_items(np.random.default_rng(0), 8, lo=4, hi=30), binary=True)
    small = encode_score_request(random_items(np.random.default_rng(1), 1, lo=4, hi=30), binary=True)
    headers = {"Content-Type": MSGPACK}

    async def go():
        async with httpx.AsyncClient(base_url=limited.url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/score", content=big, headers=headers))
            await asyncio.sleep(0.5)  # the 8 items now fill the queue while the batcher waits for more
            refused = await client.post("/v1/score", content=small, headers=headers)
            return await first, refused

    first, refused = asyncio.run(go())
    assert first.status_code == 200
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert httpx.post(limited.url + "/v1/score", content=small, headers=headers).status_code == 200
    assert 'uniopd_requests_total{route="/v1/score",status="429"} 1.0' in httpx.get(limited.url + "/metrics").text


@pytest.mark.parametrize("backend", BACKENDS)
def test_keyless_clients_score_as_their_named_team_on_a_real_teacher(tiny_model, reference, tmp_path, backend):
    """slime's teacher call (no Authorization header) against a teacher whose team file admits keyless callers as
    `keyless`: scored, counted against that team, values as transformers gives them; a wrong key is still 401."""
    teams = tmp_path / "teams.yaml"
    teams.write_text("teams:\n  alpha: {keys: [key-alpha-1]}\n  keyless: {unauthenticated: true, "
                     "tokens_per_minute: 100000}\n")
    ids = list(range(10, 40))
    body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"temperature": 0, "max_new_tokens": 0, "skip_special_tokens": False}}
    with start_teacher(tiny_model, backend, ["--api-keys", str(teams)], log_dir=tmp_path) as server:
        out = httpx.post(server.url + "/generate", json=body, timeout=60)
        usage = httpx.get(server.url + "/v1/usage").json()
        wrong = httpx.post(server.url + "/generate", json=body, headers={"Authorization": "Bearer nope"})
    assert out.status_code == 200 and usage["team"] == "keyless" and usage["requests"] == 1
    entries = out.json()["meta_info"]["input_token_logprobs"]
    np.testing.assert_allclose([e[0] for e in entries[1:]], reference.span(ids, 1), atol=1e-4)
    assert wrong.status_code == 401
