"""Thin async clients for the teacher and rollout APIs, needing only this package (no torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx

from proto.codec import ScoredSpan, b64, decode_score_response, encode_score_request
from proto.errors import ApiError
from proto.rollout import GenerateRequest, RolloutInfo, Rollouts, WeightsLoaded, decode_generate_response
from proto.schemas import JSON, MSGPACK, Fingerprint, ScoreItem, TeacherInfo, TeamUsage


class _Client:
    """`transport`: where requests go instead of the network (e.g. httpx.ASGITransport over an app, in tests)."""

    def __init__(self, base_url: str, api_key: str | None, binary: bool, timeout: float,
                 client: httpx.AsyncClient | None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = client or httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout,
                                                 transport=transport)
        self.binary = binary

    async def __aenter__(self):
        return self

    async def __aexit__(self, *_) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        """Turn an error response back into the ApiError the server raised."""
        if resp.status_code < 400:
            return
        try:
            err = resp.json()["error"]
        except Exception:
            raise ApiError(resp.status_code, "http_error", resp.text[:200]) from None
        raise ApiError(resp.status_code, err["code"], err["message"], err.get("field"), dict(resp.headers))

    @property
    def _kind(self) -> str:
        return MSGPACK if self.binary else JSON


class TeacherClient(_Client):
    """`float_dtype`: "float16" asks for half-size float arrays in msgpack responses (ScoreRequest.float_dtype)."""

    def __init__(self, base_url: str, api_key: str | None = None, binary: bool = True, timeout: float = 60.0,
                 client: httpx.AsyncClient | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 float_dtype: str = "float32") -> None:
        super().__init__(base_url, api_key, binary, timeout, client, transport)
        self.float_dtype = float_dtype
        self.bytes_sent = 0  # scoring bodies, cumulative: what the encoding costs on the wire
        self.bytes_received = 0

    async def info(self) -> TeacherInfo:
        resp = await self._http.get("/v1/info")
        self._raise_for(resp)
        return TeacherInfo.model_validate_json(resp.content)

    async def usage(self) -> TeamUsage:
        """This key's team: its usage and quotas on this teacher."""
        resp = await self._http.get("/v1/usage")
        self._raise_for(resp)
        return TeamUsage.model_validate_json(resp.content)

    async def score(self, items: Sequence[ScoreItem],
                    images: Sequence[bytes] = ()) -> tuple[Fingerprint, list[ScoredSpan]]:
        """`images`: the PNG/JPEG bytes that items' `image_indices` point into, each sent once."""
        body = encode_score_request(items, self.binary, images, self.float_dtype)
        resp = await self._http.post("/v1/score", content=body,
                                     headers={"Content-Type": self._kind, "Accept": self._kind})
        self._raise_for(resp)
        self.bytes_sent += len(body)
        self.bytes_received += len(resp.content)
        return decode_score_response(resp.content, resp.headers.get("content-type"))


class RolloutClient(_Client):
    def __init__(self, base_url: str, api_key: str | None = None, admin_key: str | None = None, binary: bool = True,
                 timeout: float = 600.0, client: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, binary, timeout, client, transport)
        self._admin = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}

    async def info(self) -> RolloutInfo:
        resp = await self._http.get("/v1/info")
        self._raise_for(resp)
        return RolloutInfo.model_validate_json(resp.content)

    async def generate(self, request: GenerateRequest) -> Rollouts:
        resp = await self._http.post("/v1/generate", content=request.model_dump_json(exclude_none=True),
                                     headers={"Content-Type": JSON, "Accept": self._kind})
        self._raise_for(resp)
        return decode_generate_response(resp.content, resp.headers.get("content-type"))

    async def push_weights(self, safetensors: bytes | bytearray) -> WeightsLoaded:
        """Upload new student weights (safetensors bytes); needs the admin key. Sent in pieces of the caller's buffer,
        which is never copied whole (a multi-GB student on the trainer's main process)."""
        resp = await self._http.post("/v1/weights", content=_pieces(memoryview(safetensors)),
                                     headers={"Content-Type": "application/octet-stream",
                                              "Content-Length": str(len(safetensors)), **self._admin})
        self._raise_for(resp)
        return WeightsLoaded.model_validate_json(resp.content)


class WeightSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over a rollout server's /v1/weights/transfer routes, for a trainer-side
    weight-transfer engine. Synchronous, as vLLM's engines call it (the update from a thread beside their broadcast).
    `loaded`: what the last finish made (vLLM's protocol returns nothing)."""

    def __init__(self, base_url: str, admin_key: str | None = None, timeout: float = 600.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self.loaded: WeightsLoaded | None = None

    def _post(self, step: str, body: dict | None = None) -> httpx.Response:
        resp = self._http.post(f"/v1/weights/transfer/{step}", json=body)
        _Client._raise_for(resp)
        return resp

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._post("init", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._post("start")

    def update_weights(self, update_info: dict) -> None:
        self._post("update", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """`weight_version`: vLLM's label for the new weights; the server numbers its versions itself."""
        self.loaded = WeightsLoaded.model_validate_json(self._post("finish").content)

    def close(self) -> None:
        self._http.close()


async def _pieces(buffer: memoryview, size: int = 1 << 24) -> AsyncIterator[memoryview]:
    for start in range(0, len(buffer), size):
        yield buffer[start:start + size]


def share_images(per_row: Sequence[Sequence[bytes]]) -> tuple[list[bytes], list[list[int]]]:
    """Each distinct image once, and every row's images as indices into that list: a group of samples of one
    prompt, or many prompts showing one picture, send its bytes once."""
    index: dict[bytes, int] = {}
    rows = [[index.setdefault(img, len(index)) for img in row] for row in per_row]
    return list(index), rows


def generate_request(prompts: Sequence[list[int]], images: Sequence[Sequence[bytes]] = (),
                     **sampling) -> GenerateRequest:
    """A GenerateRequest for prompts with their images (per prompt, in placeholder order), each image sent once."""
    shared, refs = share_images(images)
    if not shared:
        return GenerateRequest(prompts=list(prompts), **sampling)
    return GenerateRequest(prompts=list(prompts), images=[b64(img) for img in shared], image_indices=refs, **sampling)
