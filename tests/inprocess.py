"""The real FastAPI apps served in this process: lifespan run by the test, requests over httpx.ASGITransport (no
sockets, no uvicorn, no subprocess), so the default test tier checks routes, limits and auth in milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
from fastapi import FastAPI

from proto.errors import ApiError

BASE_URL = "http://inprocess"


def transport(app: FastAPI) -> httpx.ASGITransport:
    """Like a server: an app error is a 500 response, not an exception raised into the test."""
    return httpx.ASGITransport(app, raise_app_exceptions=False)


async def wait_loaded(app: FastAPI, timeout_s: float = 30.0) -> None:
    """Until the service's start-up task has loaded the backend, or failed to (what /readyz reports)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            app.state.service.ready()
            return
        except ApiError as exc:
            if exc.code != "not_ready":
                return
        assert asyncio.get_running_loop().time() < deadline, "the app did not load its backend"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(app: FastAPI, *, loaded: bool = True, headers: dict[str, str] | None = None,
                  timeout_s: float = 30.0) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan started (and, by default, its backend loaded), and a client that calls it."""
    async with app.router.lifespan_context(app):
        if loaded:
            await wait_loaded(app)
        async with httpx.AsyncClient(transport=transport(app), base_url=BASE_URL, headers=headers,
                                     timeout=timeout_s) as client:
            yield client


async def until(predicate: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Poll for a state the app reaches on its own (items queued, a call in the backend, a reload)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
