"""``ProviderHttpClient``: its direct aiohttp path answers like httpx's own path (status, headers, body, errors)."""

from __future__ import annotations

import gzip
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from pipeline.runtime.http_client import ProviderHttpClient

seen: list[dict[str, str]] = []


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    seen.append({k.lower(): v for k, v in request.headers.items()})
    status = int(request.query.get("status", "200"))
    headers = {"x-request-id": "req_1", "retry-after": "2"} if status == 429 else {"x-request-id": "req_1"}
    return web.Response(status=status, body=b'{"echo":' + body + b"}", headers=headers, content_type="application/json")


async def zipped(request: web.Request) -> web.Response:
    return web.Response(body=gzip.compress(b'{"zipped":true}'), headers={"content-encoding": "gzip"})


async def cookie(request: web.Request) -> web.Response:
    seen.append({k.lower(): v for k, v in request.headers.items()})
    response = web.Response(body=b"{}")
    response.set_cookie("session", "s1", path="/")
    return response


async def slow(request: web.Request) -> web.Response:
    import asyncio

    await asyncio.sleep(2)
    return web.Response(body=b"{}")


@pytest_asyncio.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(
        [web.post("/echo", echo), web.post("/zip", zipped), web.post("/cookie", cookie), web.post("/slow", slow)]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    seen.clear()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_direct_path_answers_like_httpx_own_path(server: str) -> None:
    body = b'{"model":"m"}'
    headers = {"Authorization": "Bearer k", "content-type": "application/json"}
    async with ProviderHttpClient(max_connections=4, timeout=5) as fast, httpx.AsyncClient(timeout=5) as plain:
        for path in ("/echo", "/echo?status=429", "/echo?status=503"):
            a = await fast.post(server + path, content=body, headers=headers, timeout=5)
            b = await plain.post(server + path, content=body, headers=headers, timeout=5)
            assert (a.status_code, a.content, a.headers.get("x-request-id")) == (b.status_code, b.content, "req_1")
            assert a.headers.get("retry-after") == b.headers.get("retry-after")
            assert a.reason_phrase == b.reason_phrase
    fast_sent, plain_sent = seen[0], seen[1]
    assert fast_sent["authorization"] == "Bearer k" and fast_sent["content-length"] == str(len(body))
    assert fast_sent["user-agent"] == plain_sent["user-agent"]  # the client's default headers go out too
    assert fast_sent["accept-encoding"] == plain_sent["accept-encoding"]


async def test_gzip_body_is_decoded(server: str) -> None:
    async with ProviderHttpClient(max_connections=2) as client:
        response = await client.post(server + "/zip", content=b"{}", timeout=5)
    assert response.json() == {"zipped": True}


async def test_a_cookie_a_provider_sets_is_sent_back(server: str) -> None:
    async with ProviderHttpClient(max_connections=2) as client:
        await client.post(server + "/cookie", content=b"{}", timeout=5)
        assert client.cookies.get("session") == "s1"
        await client.post(server + "/cookie", content=b"{}", timeout=5)
    assert "cookie" not in seen[0] and seen[1]["cookie"] == "session=s1"


async def test_transport_failures_are_httpx_errors(server: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    async with ProviderHttpClient(max_connections=2) as client:
        with pytest.raises(httpx.TransportError):
            await client.post(f"http://127.0.0.1:{closed_port}/x", content=b"{}", timeout=2)
        with pytest.raises(httpx.TimeoutException):
            await client.post(server + "/slow", content=b"{}", timeout=0.2)


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ProviderHttpClient(max_connections=0)
