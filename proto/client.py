"""A thin async client for the teacher API, needing only this package (no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from proto.codec import ScoredSpan, decode_score_response, encode_score_request
from proto.errors import ApiError
from proto.schemas import JSON, MSGPACK, Fingerprint, ScoreItem, TeacherInfo


class TeacherClient:
    def __init__(self, base_url: str, api_key: str | None = None, binary: bool = True, timeout: float = 60.0,
                 client: httpx.AsyncClient | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = client or httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)
        self.binary = binary
        self.bytes_sent = 0  # scoring bodies, cumulative: what the encoding costs on the wire
        self.bytes_received = 0

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        try:
            err = resp.json()["error"]
        except Exception:
            raise ApiError(resp.status_code, "http_error", resp.text[:200]) from None
        raise ApiError(resp.status_code, err["code"], err["message"], err.get("field"), dict(resp.headers))

    async def info(self) -> TeacherInfo:
        resp = await self._http.get("/v1/info")
        self._raise_for(resp)
        return TeacherInfo.model_validate_json(resp.content)

    async def score(self, items: Sequence[ScoreItem]) -> tuple[Fingerprint, list[ScoredSpan]]:
        kind = MSGPACK if self.binary else JSON
        body = encode_score_request(items, self.binary)
        resp = await self._http.post("/v1/score", content=body, headers={"Content-Type": kind, "Accept": kind})
        self._raise_for(resp)
        self.bytes_sent += len(body)
        self.bytes_received += len(resp.content)
        return decode_score_response(resp.content, resp.headers.get("content-type"))
