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
"""

from __future__ import annotations

from typing import Any

import httpx
from httpx_aiohttp import HttpxAiohttpClient

__all__ = ["ProviderHttpClient"]


class _SetCookieOnlyCookies(httpx.Cookies):
    """``httpx.Cookies`` that skips the cookie look-up for a response without ``Set-Cookie``."""

    def extract_cookies(self, response: httpx.Response) -> None:
        """Store the cookies ``response`` sets, if it sets any."""
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


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

    @property
    def cookies(self) -> httpx.Cookies:
        """The cookie jar (cookies providers set are sent back to them)."""
        cookies: httpx.Cookies = self._cookies
        return cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._cookies = _SetCookieOnlyCookies(httpx.Cookies(cookies).jar)
