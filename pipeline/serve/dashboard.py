"""The operator dashboard (DESIGN A12): ``/dashboard`` on ``aipipe serve``, or alone with ``aipipe dashboard``.

``DashboardFeed`` reads ``ai.control``, ``ai.costs``, ``ai.responses`` and
``ai.deadletter`` from the beginning as broadcast readers (background
fetching: the page needs no 10 ms reaction) and folds them into an
``OperatorBoard``; once a second it renders a ``DashboardSnapshot`` to JSON,
which every open page receives as a server-sent event (``text/event-stream``,
the WHATWG HTML standard's EventSource format: ``event:`` and ``data:`` lines,
a blank line after each event).

``dashboard_app`` is the Starlette app mounted at ``/dashboard``:

* ``GET /dashboard``: the page (HTML and JavaScript from the package, no
  build step; charts by the vendored uPlot), or the login form;
* ``POST /dashboard/login`` (form field ``key``): an operator key of the
  ``[operators]`` table of ``AIPIPE_API_KEYS`` sets a signed session cookie
  holding the operator's name (never the key; signed by Starlette's
  ``SessionMiddleware`` with ``itsdangerous``), then redirects to the page;
  a wrong key gets the form again with 401;
* ``POST /dashboard/logout``;
* ``GET /dashboard/state``: the snapshot as JSON; ``GET /dashboard/events``:
  the stream; ``GET /dashboard/requests/{id}`` (or ``/dashboard/request?id=``,
  for any id): one request's detail;
* ``GET /dashboard/static/...``: the page's files.

Read-only: nothing here publishes. Without a key file the dashboard is open
(development only, like the endpoint; ``aipipe serve`` refuses production
without one).
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.bus.kafka import broker_answers
from pipeline.bus.protocol import Bus, BusError
from pipeline.bus.topics import Topics
from pipeline.client.operator_board import OperatorBoard
from pipeline.runtime.logs import OUTAGE
from pipeline.runtime.messages import CONTROL_DECODER, COST_DECODER
from pipeline.serve.keys import ApiKeys
from schemas import DeadLetter
from schemas.response import AIResponse
from stages.rules.archive_state import is_restored_id

__all__ = ["DashboardFeed", "DashboardSettings", "dashboard_app", "open_dashboard"]

log = logging.getLogger("aipipe.dashboard")

_RESPONSE_DECODER = msgspec.json.Decoder(AIResponse)
_DEAD_LETTER_DECODER = msgspec.json.Decoder(DeadLetter)
_ENCODER = msgspec.json.Encoder()
#: Session cookie of the dashboard (signed; holds the operator's name and the time of login).
SESSION_COOKIE = "aipipe_dashboard"
#: How long a dashboard session lasts (s).
SESSION_MAX_AGE_S = 8 * 3600
#: Largest login form body read (bytes); a longer one is refused with 413 before it is all read.
MAX_LOGIN_BYTES = 4096
#: Headers of every page and JSON answer: no framing by other sites, no content sniffing, scripts from here only.
SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "referrer-policy": "no-referrer",
}
#: The page treats the pipeline as disconnected when the broker has not answered for this long (s).
STALE_AFTER_S = 3.0


class DashboardFeed:
    """The dashboard's broadcast readers and its snapshot ticker.

    Args:
        bus: a started bus.
        topics: the topic names.
        board: the fold to feed.
        tick_s: how often the snapshot is rendered and pushed to the pages (s).
        probe: checks that the broker answers (``None``: always connected, the in-process bus).
    """

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        board: OperatorBoard,
        *,
        tick_s: float = 1.0,
        probe: Callable[[], Any] | None = None,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.board = board
        self.tick_s = tick_s
        self.probe = probe
        self.connected = True
        self.disconnected_since: float | None = None
        self._json = b"{}"
        self._tick = anyio.Event()
        self._restarts = 0

    @property
    def latest_json(self) -> bytes:
        """The latest snapshot, JSON bytes, with ``connected`` (bool) and ``disconnected_s`` (s or null) added."""
        return self._json

    async def next_tick(self) -> None:
        """Wait for the next rendered snapshot."""
        await self._tick.wait()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read the four topics and render snapshots until cancelled; reports started once every reader is open.

        Raises:
            BusError: when a reader cannot be opened.
        """
        async with anyio.create_task_group() as tg:
            for topic, apply in (
                (self.topics.control, self._control),
                (self.topics.costs, self._cost),
                (self.topics.responses, self._response),
                (self.topics.deadletter, self._dead_letter),
            ):
                await tg.start(self._read, topic, apply)
            self._render()
            task_status.started()
            tg.start_soon(self._watch_broker)
            while True:
                await anyio.sleep(self.tick_s)
                self._render()

    def _render(self) -> None:
        snapshot = msgspec.to_builtins(self.board.snapshot())
        snapshot["connected"] = self.connected
        since = self.disconnected_since
        snapshot["disconnected_s"] = round(time.monotonic() - since, 1) if since is not None else None
        self._json = _ENCODER.encode(snapshot)
        self._tick.set()
        self._tick = anyio.Event()

    async def _watch_broker(self) -> None:
        if self.probe is None:
            return
        while True:
            try:
                answered = bool(await self.probe())
            except Exception:  # a probe that fails is a broker that does not answer
                answered = False
            if answered:
                self.connected, self.disconnected_since = True, None
            elif self.connected:
                self.connected, self.disconnected_since = False, time.monotonic()
                log.warning("dashboard: the broker does not answer", extra=OUTAGE)
            await anyio.sleep(1.0)

    async def _read(self, topic: str, apply: Callable[[Any], None], *, task_status: anyio.abc.TaskStatus[None]) -> None:
        consumer = await self.bus.consumer([topic], group=None, from_beginning=True, background=True)
        task_status.started()
        try:
            while True:
                try:
                    records = await consumer.getmany(500, max_records=1000)
                except BusError as exc:
                    log.warning("dashboard: reading %s failed (%s); retrying", topic, exc, extra=OUTAGE)
                    await anyio.sleep(1.0)
                    continue
                self._restarts = max(self._restarts, getattr(consumer, "restarts", 0))
                for record in records:
                    try:
                        apply(record)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        log.debug("dashboard: skipping an undecodable value on %s: %s", topic, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()

    def _control(self, record: Any) -> None:
        self.board.apply_control(CONTROL_DECODER.decode(record.value))

    def _cost(self, record: Any) -> None:
        event = COST_DECODER.decode(record.value)
        if self._restarts and is_restored_id(event.id):
            return  # a roll-up of spend this board has counted already, restored into a new broker
        self.board.apply_cost(event)

    def _response(self, record: Any) -> None:
        response = _RESPONSE_DECODER.decode(record.value)
        at_s = record.timestamp_ms / 1000 if record.timestamp_ms else time.time()
        self.board.apply_response(response, at_s=at_s, traceparent=record.header("traceparent"))

    def _dead_letter(self, record: Any) -> None:
        self.board.apply_dead_letter(_DEAD_LETTER_DECODER.decode(record.value))


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """What the dashboard app needs: the feed, the key file (``None``: open, development only), the cookie secret."""

    feed: DashboardFeed
    keys: ApiKeys | None
    secret: str
    https_only: bool = False


def session_secret(env: dict[str, str] | os._Environ[str]) -> str:
    """The session cookie's signing secret: ``AIPIPE_DASHBOARD_SECRET``, else a random one per process.

    With a random secret, sessions end when the process restarts (operators log in again); set the
    variable to the same value on every replica behind one address.
    """
    return env.get("AIPIPE_DASHBOARD_SECRET") or secrets.token_urlsafe(32)


def _page(name: str) -> str:
    return resources.files("pipeline.serve").joinpath("static", name).read_text(encoding="utf-8")


def _login_form(message: str = "", *, status: int = 200, no_operators: bool = False) -> HTMLResponse:
    note = (
        "<p class='error'>The key file has no [operators] table: no key opens the dashboard.</p>"
        if no_operators
        else ""
    )
    error = f"<p class='error' id='login-error'>{html.escape(message)}</p>" if message else ""
    body = _page("login.html").replace("<!--MESSAGE-->", note + error)
    return HTMLResponse(body, status_code=status, headers={"cache-control": "no-store", **SECURITY_HEADERS})


def _home(request: Request) -> str:
    """The page's own path, wherever the app is mounted (``/dashboard/`` on ``aipipe serve``)."""
    return f"{request.scope.get('root_path', '')}/"


def dashboard_app(settings: DashboardSettings) -> Starlette:
    """The Starlette app to mount at ``/dashboard`` (see the module docstring)."""
    feed, keys = settings.feed, settings.keys

    def operator(request: Request) -> str | None:
        if keys is None:
            return "development (open dashboard)"
        name = request.session.get("operator")
        if isinstance(name, str) and name and keys.is_operator(name):
            return name
        return None  # no session, or its operator is no longer in the key file

    def refuse(request: Request) -> Response:
        if request.headers.get("accept", "").startswith("text/html"):
            return RedirectResponse(_home(request), status_code=303)
        return Response(b'{"error": "log in with an operator key"}', 401, media_type="application/json")

    async def page(request: Request) -> Response:
        name = operator(request)
        if name is None:
            return _login_form(no_operators=keys is not None and keys.operator_count == 0)
        body = _page("dashboard.html").replace("<!--OPERATOR-->", html.escape(name))
        return HTMLResponse(body, headers={"cache-control": "no-store", **SECURITY_HEADERS})

    async def login(request: Request) -> Response:
        if keys is None:
            return RedirectResponse(_home(request), status_code=303)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return Response(b"the login form posts application/x-www-form-urlencoded", 415)
        raw = b""
        async for chunk in request.stream():  # never more than MAX_LOGIN_BYTES in memory
            raw += chunk
            if len(raw) > MAX_LOGIN_BYTES:
                return Response(b"login body too large", 413)
        fields = parse_qs(raw.decode("utf-8", "replace"))
        key = (fields.get("key") or [""])[0].strip()
        name = keys.operator_for(key) if key else None
        if name is None:
            client = request.client.host if request.client is not None else "-"
            log.info("dashboard: a login from %s with a key that is not an operator key", client)
            return _login_form("That is not an operator key.", status=401, no_operators=keys.operator_count == 0)
        request.session.clear()
        request.session["operator"] = name
        log.info("dashboard: operator %s logged in", name)
        return RedirectResponse(_home(request), status_code=303)

    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse(_home(request), status_code=303)

    async def state(request: Request) -> Response:
        if operator(request) is None:
            return refuse(request)
        return Response(
            feed.latest_json, media_type="application/json", headers={"cache-control": "no-store", **SECURITY_HEADERS}
        )

    async def one_request(request: Request) -> Response:
        if operator(request) is None:
            return refuse(request)
        request_id = request.path_params.get("request_id") or request.query_params.get("id", "")
        found = feed.board.request(request_id)
        if found is None:
            return Response(b'{"error": "not among the latest requests"}', 404, media_type="application/json")
        return Response(_ENCODER.encode(found), media_type="application/json")

    async def events(request: Request) -> Response:
        if operator(request) is None:
            return refuse(request)

        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 2000\n\n"
            while True:
                yield b"event: snapshot\ndata: " + feed.latest_json + b"\n\n"
                with contextlib.suppress(TimeoutError):
                    with anyio.fail_after(15):
                        await feed.next_tick()
                if await request.is_disconnected():
                    return

        headers = {"cache-control": "no-store", "x-accel-buffering": "no", **SECURITY_HEADERS}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    static = StaticFiles(packages=[("pipeline.serve", "static")])
    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"], name="dashboard_page"),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/state", state, methods=["GET"]),
            Route("/events", events, methods=["GET"]),
            Route("/requests/{request_id:path}", one_request, methods=["GET"]),
            Route("/request", one_request, methods=["GET"]),
            Mount("/static", app=static, name="static"),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=settings.secret,
                session_cookie=SESSION_COOKIE,
                max_age=SESSION_MAX_AGE_S,
                path="/dashboard",
                same_site="strict",
                https_only=settings.https_only,
            )
        ],
    )
    return app


def open_dashboard(
    bus: Bus,
    topics: Topics,
    config: Any,
    keys: ApiKeys | None,
    env: Any,
    *,
    bootstrap: str | None = None,
) -> tuple[DashboardFeed, Starlette]:
    """The dashboard's feed (to run with ``feed.run``) and its app (to mount at ``/dashboard``).

    Args:
        bus: a started bus.
        topics: the topic names.
        config: the pipeline's configuration (``PipelineConfig``).
        keys: the key file's keys (``None``: an open dashboard, development only).
        env: the environment (``AIPIPE_DASHBOARD_SECRET``).
        bootstrap: the Kafka broker, probed each second to tell the page when it is unreachable.
    """
    probe = (lambda: broker_answers(bootstrap, 1.0)) if bootstrap else None
    feed = DashboardFeed(bus, topics, OperatorBoard(config), probe=probe)
    return feed, dashboard_app(DashboardSettings(feed=feed, keys=keys, secret=session_secret(env)))
