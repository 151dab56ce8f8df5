"""The HTTP client a process shares for its provider calls (executor, health probes).

httpx's API on the aiohttp transport (``httpx_aiohttp``): httpx's own
connection pool collapses past ~100 concurrent calls, the aiohttp one does not
(``PERFORMANCE-NOTES.md``; ``aipipe bench`` measures both). Two settings
matter under load:

* the connection pool holds as many connections as the stage has messages in
  flight (``AIPIPE_MAX_IN_FLIGHT``), so calls never queue for a connection
  (the transport's default is 100);
* cookies are parsed only from responses that set one. httpx builds two
  ``urllib`` wrapper objects per response to look for ``Set-Cookie``
  (``httpx.Cookies.extract_cookies``); provider APIs rarely set cookies, and
  that look-up was ~3 % of the pipeline's CPU per request in ``aipipe bench``.
  A cookie a provider does set is still kept and sent back, as before.

``post`` with a ``bytes`` body (the only call the provider adapters make,
``stages.providers.classify.post_json``) goes straight to the transport's
aiohttp session: the same request on the wire (the client's default headers,
the same per-phase timeouts, aiohttp errors mapped to httpx's by
``httpx_aiohttp``), answered with an ``httpx.Response`` built from the raw
status, headers and body, but without httpx's per-call request building and
response streaming (about a fifth of the in-process pipeline's CPU per
request in ``aipipe bench``). Any other call, or a client with another
transport, proxies or cookies to send, takes httpx's own path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from aiohttp import ClientSession, ClientTimeout
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient
from httpx_aiohttp.transport import map_aiohttp_exceptions

__all__ = ["ProviderHttpClient"]


class _SetCookieOnlyCookies(httpx.Cookies):
    """``httpx.Cookies`` that skips the cookie look-up for a response without ``Set-Cookie``.

    ``maybe_set`` says whether the jar may hold a cookie (checking the jar itself takes its lock).
    """

    def __init__(self, cookies: Any = None) -> None:
        super().__init__(cookies)
        self.maybe_set = bool(self)

    def extract_cookies(self, response: httpx.Response) -> None:
        """Store the cookies ``response`` sets, if it sets any."""
        if "set-cookie" in response.headers:
            super().extract_cookies(response)
            self.maybe_set = True


class ProviderHttpClient(HttpxAiohttpClient):  # type: ignore[misc]
    """``httpx.AsyncClient`` on the aiohttp transport, sized for ``max_connections`` calls at once.

    Args:
        max_connections: connections kept open at most (>= 1); set it to the
            messages a stage handles at once.
        **kwargs: passed to ``httpx.AsyncClient`` (``timeout``, ``transport``...).

    Raises:
        ValueError: when ``max_connections`` < 1.
    """

    def __init__(self, *, max_connections: int, **kwargs: Any) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        super().__init__(limits=limits, **kwargs)
        self._cookies = _SetCookieOnlyCookies(self._cookies.jar)
        self._default_headers = dict(self.headers.items())

    def _fast_session(self) -> ClientSession | None:
        """The aiohttp session to send on directly, or ``None`` when httpx's own path is needed."""
        transport = getattr(self, "_transport", None)
        hooks = getattr(self, "_event_hooks", {})
        if type(transport) is not AiohttpTransport or getattr(self, "_mounts", None):
            return None
        if getattr(self._cookies, "maybe_set", True) or hooks.get("request") or hooks.get("response"):
            return None
        if not isinstance(transport.client, ClientSession):
            transport.client = transport.get_client()  # as AiohttpTransport.handle_async_request does
        return transport.client if isinstance(transport.client, ClientSession) else None

    def _aiohttp_timeout(self, timeout: Any) -> ClientTimeout:
        if isinstance(timeout, float | int):  # the adapters' case: one limit (s) for every phase
            return ClientTimeout(sock_connect=timeout, sock_read=timeout, connect=timeout)
        phases = self.timeout if isinstance(timeout, type(httpx.USE_CLIENT_DEFAULT)) else httpx.Timeout(timeout)
        return ClientTimeout(sock_connect=phases.connect, sock_read=phases.read, connect=phases.pool)

    async def post(  # type: ignore[override]
        self,
        url: httpx.URL | str,
        *,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,
        **kwargs: Any,
    ) -> httpx.Response:
        """POST ``content``; a ``bytes`` body with only ``headers``/``timeout`` goes straight to aiohttp.

        Returns:
            The response, body read (``content``), as httpx's path returns it.

        Raises:
            httpx.HTTPError: the httpx error of a transport failure (connect, read timeout, reset...).
        """
        session = self._fast_session() if isinstance(content, bytes) and not kwargs else None
        if session is None:
            return await super().post(url, content=content, headers=headers, timeout=timeout, **kwargs)
        send_headers = dict(self._default_headers)
        if headers:
            send_headers.update((key.lower(), value) for key, value in headers.items())
        with map_aiohttp_exceptions():
            async with session.post(
                str(url),
                data=content,
                headers=send_headers,
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=self._aiohttp_timeout(timeout),
            ) as answer:
                body = await answer.read()
                status, raw_headers, reason = answer.status, answer.raw_headers, answer.reason
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": (reason or "").encode()}
        # httpx decodes ``content-encoding`` (gzip, br...) from the raw body, as on its own path.
        response = httpx.Response(status, headers=list(raw_headers), content=body, extensions=extensions)
        if "set-cookie" in response.headers:  # rare: keep it, as httpx's path would
            response.request = httpx.Request("POST", url, headers=send_headers)
            self._cookies.extract_cookies(response)
        return response

    @property
    def cookies(self) -> httpx.Cookies:
        """The cookie jar (cookies providers set are sent back to them)."""
        cookies: httpx.Cookies = self._cookies
        return cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._cookies = _SetCookieOnlyCookies(httpx.Cookies(cookies).jar)
