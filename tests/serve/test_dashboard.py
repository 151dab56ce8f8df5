"""The operator dashboard (DESIGN A12): its fold, its operator login, and the page in a real headless browser."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from pipeline import AIProviderManager
from pipeline.client.operator_board import OperatorBoard, trace_id_of
from pipeline.emulator import EmulatorServer
from pipeline.runtime.config import config_from_mapping, preset
from pipeline.serve.dashboard import SESSION_COOKIE
from pipeline.serve.openai_server import OpenAIServer
from schemas import DeadLetter
from schemas.events import BudgetAlert, BudgetStatus, BudgetWindow, CircuitTransition, CostEvent, Health, SetBudget
from schemas.response import AIResponse, Attempt, ErrorInfo, Usage

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
OPERATOR_KEY = "op-key-for-the-dashboard-0123456789"
CLIENT_KEY = "sk-client-key-not-an-operator-987654"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# --- the fold ---------------------------------------------------------------------------------


def _config() -> Any:
    return preset("development")


def test_the_board_folds_circuits_traffic_spend_budgets_requests_and_dead_letters() -> None:
    now = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
    clock = now.timestamp
    board = OperatorBoard(_config(), clock=clock)
    at = now - timedelta(seconds=10)
    board.apply_control(Health(provider="openai", model="gpt-4o-mini", ok=True, latency_ms=100.0, at=at))
    board.apply_control(Health(provider="openai", model="gpt-4o-mini", ok=True, latency_ms=300.0, at=at))
    board.apply_control(
        CircuitTransition(provider="cloudflare", from_state="CLOSED", to_state="OPEN", reason="5 failures", at=at)
    )
    ok = AIResponse(id="r1", status="ok", provider="openai", model="gpt-4o-mini", cost_usd=0.5, latency_ms=120.0,
                    attempts=[Attempt(provider="cloudflare", model="llama", outcome="error", error_type="server_error"),
                              Attempt(provider="openai", model="gpt-4o-mini", outcome="ok")])  # fmt: skip
    failed = AIResponse(id="r2", status="error", error=ErrorInfo(type="rate_limit", message="slow down"))
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    board.apply_response(ok, at_s=at.timestamp(), traceparent=traceparent)
    board.apply_response(ok, at_s=at.timestamp(), traceparent=traceparent)  # a duplicate answer counts once
    board.apply_response(failed, at_s=at.timestamp())
    board.apply_cost(CostEvent(id="r1", user="alice", provider="openai", model="gpt-4o-mini", usage=Usage(),
                               cost_usd=0.5, at=at))  # fmt: skip
    board.apply_control(SetBudget(scope="global", daily_usd=2.0, at=at))
    board.apply_control(
        BudgetAlert(scope="global", window="daily", threshold_pct=20, spent_usd=0.5, limit_usd=2.0, at=at)
    )
    board.apply_dead_letter(
        DeadLetter(
            source_topic="ai.requests",
            partition=0,
            offset=7,
            key="bad",
            reason="not JSON",
            stage="cache",
            raw=b"{oops",
            at=at,
        )
    )
    snap = board.snapshot()

    providers = {p.name: p for p in snap.providers}
    assert set(providers) >= {"openai", "cloudflare"}
    assert providers["cloudflare"].state == "OPEN" and providers["cloudflare"].transitions[0].to_state == "OPEN"
    assert (providers["openai"].p50_ms, providers["openai"].p95_ms) == (100.0, 300.0)
    assert providers["openai"].calls_per_s == round(2 / 60, 2)
    second = next(s for s in snap.traffic.seconds if s.t == int(at.timestamp()))
    assert (second.ok, second.fallback, second.errors) == (1, 1, {"rate_limit": 1})
    assert snap.traffic.failovers_last_minute == 1 and snap.traffic.errors_last_minute == {"rate_limit": 1}
    assert [r.id for r in snap.requests] == ["r2", "r1"]
    first = snap.requests[1]
    assert first.trace_id == "0af7651916cd43dd8448eb211c80319c" and first.cost_event is None  # kept out of the stream
    detail = board.request("r1")
    assert detail is not None and detail.cost_event is not None and detail.cost_event.user == "alice"
    assert [a.provider for a in first.attempts] == ["cloudflare", "openai"]
    assert {s.name: s.today_usd for s in snap.spend_by_provider}["openai"] == 0.5
    assert [(s.name, s.month_usd) for s in snap.spend_by_user] == [("alice", 0.5)]
    bar = next(b for b in snap.budgets if (b.scope, b.window) == ("global", "daily"))
    assert (bar.limit_usd, bar.spent_usd, bar.percent, bar.alerts) == (2.0, 0.5, 25.0, [20])
    assert bar.projected_usd == pytest.approx(1.0)  # $0.50 in the day's first half: $1.00 by midnight
    assert snap.dead_letters[0].reason == "not JSON" and snap.dead_letters[0].size == 5


def test_budget_bars_show_the_gates_reservations_and_only_this_windows_alerts() -> None:
    now = datetime(2026, 12, 6, 18, 0, 0, tzinfo=UTC)
    board = OperatorBoard(_config(), clock=now.timestamp)
    yesterday = now - timedelta(days=1)
    board.apply_control(
        BudgetAlert(scope="user:bob", window="daily", threshold_pct=80, spent_usd=8, limit_usd=10, at=yesterday)
    )
    window = BudgetWindow(limit_usd=10.0, spent_usd=0.0, reserved_usd=1.25, resets_at=datetime(2026, 12, 7, tzinfo=UTC))
    board.apply_control(BudgetStatus(scope="user:bob", windows={"daily": window}, at=now))
    bar = next(b for b in board.snapshot().budgets if b.scope == "user:bob")
    assert (bar.limit_usd, bar.reserved_usd, bar.alerts, bar.projected_usd) == (10.0, 1.25, [], 0.0)


def test_trace_ids_come_from_well_formed_traceparents_only() -> None:
    assert trace_id_of(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of(None) is None and trace_id_of(b"garbage") is None and trace_id_of(b"00-abc-def-01") is None


# --- the endpoint: operator login -------------------------------------------------------------


@asynccontextmanager
async def dashboard_server(
    emu: EmulatorServer, prefix: str, tmp_path: Path, *, operators: bool = True
) -> AsyncIterator[tuple[AIProviderManager, OpenAIServer]]:
    keys = tmp_path / "keys.toml"
    text = f'[keys]\n"{CLIENT_KEY}" = "carol"\n'
    if operators:
        text += f'[operators]\n"{OPERATOR_KEY}" = "ops-anna"\n'
    keys.write_text(text)
    environ = {
        "AIPIPE_EMULATE": "1",
        "AIPIPE_EMULATOR_URL": emu.url,
        "AIPIPE_TOPIC_PREFIX": prefix,
        "AIPIPE_API_KEYS": str(keys),
    }
    fast = {"retry": {"max_attempts": 1, "base_delay_ms": 1}, "breaker": {"failure_threshold": 2}}
    data: dict[str, Any] = {"providers": {p: dict(fast) for p in ("openai", "cloudflare")}}
    manager = AIProviderManager(config_from_mapping(data, base=preset("development")), environ, bus="memory")
    async with manager, OpenAIServer(manager) as server:
        yield manager, server


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer() as emu:
        yield emu


async def test_only_an_operator_key_opens_the_dashboard_and_the_cookie_never_holds_it(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    async with dashboard_server(emulator, "dash-auth.", tmp_path) as (_, server):
        base = server.dashboard_url
        async with httpx.AsyncClient(follow_redirects=False) as http:
            form = await http.get(base)
            assert form.status_code == 200 and 'name="key"' in form.text and "ops-anna" not in form.text
            assert (await http.get(base + "state")).status_code == 401
            assert (await http.get(base + "events")).status_code == 401
            refused = await http.post(base + "login", data={"key": CLIENT_KEY})
            assert refused.status_code == 401 and "not an operator key" in refused.text
            assert SESSION_COOKIE not in refused.cookies and CLIENT_KEY not in refused.text
            assert (await http.get(f"{base}?key={OPERATOR_KEY}")).status_code == 200  # a key in the URL does nothing
            assert (await http.get(base + "state")).status_code == 401

            logged_in = await http.post(base + "login", data={"key": OPERATOR_KEY})
            assert logged_in.status_code == 303 and logged_in.headers["location"] == "/dashboard/"
            cookie = logged_in.cookies[SESSION_COOKIE]
            set_cookie = logged_in.headers["set-cookie"].lower()
            assert OPERATOR_KEY not in logged_in.headers["set-cookie"] and OPERATOR_KEY not in cookie
            assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/dashboard" in set_cookie
            page = await http.get(base)
            assert page.status_code == 200 and "ops-anna" in page.text and 'id="providers"' in page.text
            state = await http.get(base + "state")
            assert state.status_code == 200 and {p["name"] for p in state.json()["providers"]} >= {"openai"}
            unknown = await http.get(base + "request", params={"id": ".."})
            assert unknown.status_code == 404 and unknown.json()["error"]

            forged = httpx.AsyncClient(cookies={SESSION_COOKIE: cookie[:-4] + "AAAA"})
            async with forged:
                assert (await forged.get(base + "state")).status_code == 401  # a cookie not signed by us

            await http.post(base + "logout")
            assert (await http.get(base + "state")).status_code == 401


async def test_a_key_file_without_operators_opens_the_dashboard_to_nobody(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    async with dashboard_server(emulator, "dash-noop.", tmp_path, operators=False) as (_, server):
        async with httpx.AsyncClient() as http:
            form = await http.get(server.dashboard_url)
            assert "no [operators] table" in form.text
            assert (await http.post(server.dashboard_url + "login", data={"key": CLIENT_KEY})).status_code == 401


# --- the page in a real browser -----------------------------------------------------------------


def _browser() -> Any:
    """Debian's chromium through Debian's chromedriver, the driver path given (no driver download)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
            "(`make browser`, which `make test` runs)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


async def _until(driver: Any, script: str, expect: Any, timeout_s: float = 8.0) -> Any:
    """Poll ``script`` in the page (off the event loop) until it returns something ``expect`` accepts."""
    deadline = time.monotonic() + timeout_s
    value: Any = None
    while time.monotonic() < deadline:
        value = await anyio.to_thread.run_sync(driver.execute_script, script)
        if expect(value):
            return value
        await anyio.sleep(0.2)
    raise AssertionError(f"the page did not show it within {timeout_s} s; last value: {value!r}")


PROVIDERS_JS = "return Array.from(document.querySelectorAll('#providers .card')).map(e => e.dataset.provider)"
REQUEST_IDS_JS = "return Array.from(document.querySelectorAll('#requests tr[data-id]')).map(e => e.dataset.id)"
STATE_JS = (
    "const e = document.querySelector('#providers .card[data-provider=\"openai\"] .state'); return e && e.textContent"
)
BUDGET_JS = (
    'const e = document.querySelector(\'#budgets .budget[data-scope="global"][data-window="daily"]\');'
    "return e && e.textContent.replace(/\\s+/g, ' ')"
)


async def test_the_page_shows_providers_then_a_request_a_circuit_transition_and_a_budget_change(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    async with dashboard_server(emulator, "dash-browser.", tmp_path) as (manager, server):
        driver = await anyio.to_thread.run_sync(_browser)
        try:
            await anyio.to_thread.run_sync(driver.get, server.dashboard_url)
            await anyio.to_thread.run_sync(driver.find_element, "id", "key")
            field = driver.find_element("id", "key")
            await anyio.to_thread.run_sync(field.send_keys, OPERATOR_KEY)
            await anyio.to_thread.run_sync(driver.find_element("id", "login-button").click)
            await _until(driver, "return document.querySelector('#operator')?.textContent", lambda v: v == "ops-anna")
            shown = await _until(driver, PROVIDERS_JS, lambda v: v and set(v) >= {"openai", "cloudflare"})
            assert set(shown) == {name for name, p in manager.config.providers.items() if p.enabled}
            await _until(driver, "return document.querySelector('#conn').textContent", lambda v: v == "live")

            client = openai.AsyncOpenAI(base_url=server.base_url, api_key=CLIENT_KEY, max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello dashboard"}], max_tokens=16
            )
            request_id = raw.headers["x-aipipe-request-id"]
            await _until(driver, REQUEST_IDS_JS, lambda ids: ids and request_id in ids)

            emulator.faults.set("openai", {"default": {"status": 500}})  # two failures open its circuit
            for i in range(2):  # gpt-4o-mini is served by OpenAI only: each call fails (502)
                with pytest.raises(openai.APIStatusError):
                    await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"fail {i}"}], max_tokens=16
                    )
            await _until(driver, STATE_JS, lambda v: v == "OPEN")
            transitions = await _until(
                driver,
                "return document.querySelector('#providers .card[data-provider=\"openai\"] .transitions').textContent",
                lambda v: "CLOSED → OPEN" in (v or ""),
            )
            assert "OPEN" in transitions

            await manager.set_budget("global", daily=7.5)
            budget = await _until(driver, BUDGET_JS, lambda v: v and "of $7.5000" in v)
            assert "global daily" in budget

            detail_row = f"#requests tr[data-id='{request_id}']"
            await anyio.to_thread.run_sync(driver.execute_script, f'document.querySelector("{detail_row}").click()')
            trace = await _until(
                driver, "return document.querySelector('#detail-trace')?.textContent", lambda v: v and len(v) == 32
            )
            assert trace != "-"

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            await anyio.to_thread.run_sync(driver.save_screenshot, str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            await anyio.to_thread.run_sync(driver.quit)


def test_chromium_and_its_driver_are_debians() -> None:
    """The browser tests use the system's chromium and chromedriver, never a downloaded driver."""
    assert shutil.which("chromium") == CHROMIUM or Path(CHROMIUM).exists()
    assert Path(CHROMEDRIVER).exists()


def test_operator_keys_are_read_checked_and_never_quoted(tmp_path: Path) -> None:
    from pipeline.serve.keys import ApiKeys, ServeConfigError

    both = tmp_path / "keys.toml"
    both.write_text(f'[keys]\n"{CLIENT_KEY}" = "carol"\n[operators]\n"{OPERATOR_KEY}" = "ops-anna"\n')
    keys = ApiKeys.from_file(both)
    assert keys.operator_for(OPERATOR_KEY) == "ops-anna" and keys.operator_for(CLIENT_KEY) is None
    assert keys.user_for(OPERATOR_KEY) is None and keys.operator_count == 1
    assert OPERATOR_KEY not in repr(keys)
    only_operators = tmp_path / "ops.toml"
    only_operators.write_text(f'[operators]\n"{OPERATOR_KEY}" = "ops-anna"\n')
    assert ApiKeys.from_file(only_operators).operator_for(OPERATOR_KEY) == "ops-anna"
    nameless = tmp_path / "nameless.toml"
    nameless.write_text(f'[operators]\n"{OPERATOR_KEY}" = ""\n')
    with pytest.raises(ServeConfigError, match="operator key needs a name") as bad:
        ApiKeys.from_file(nameless)
    assert OPERATOR_KEY not in str(bad.value)


async def test_the_feed_says_when_the_broker_does_not_answer_and_when_it_is_back() -> None:
    import json

    from pipeline.bus.memory import MemoryBus
    from pipeline.bus.topics import Topics
    from pipeline.serve.dashboard import DashboardFeed

    answers = True

    async def probe() -> bool:
        return answers

    bus = MemoryBus()
    await bus.start()
    feed = DashboardFeed(bus, Topics("dash-feed."), OperatorBoard(_config()), tick_s=0.05, probe=probe)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(feed.run)
            assert json.loads(feed.latest_json)["connected"] is True
            answers = False
            with anyio.fail_after(5):
                while json.loads(feed.latest_json)["connected"]:
                    await feed.next_tick()
            assert json.loads(feed.latest_json)["disconnected_s"] >= 0
            answers = True
            with anyio.fail_after(5):
                while not json.loads(feed.latest_json)["connected"]:
                    await feed.next_tick()
            assert json.loads(feed.latest_json)["disconnected_s"] is None
            tg.cancel_scope.cancel()
    finally:
        await bus.stop()


def test_top_users_are_this_months_and_stopped_cache_replicas_and_refused_limits_leave_the_page() -> None:
    from schemas.events import CacheStats

    now = datetime(2026, 12, 20, 12, 0, 0, tzinfo=UTC)
    board = OperatorBoard(_config(), clock=now.timestamp, top_users=2)
    last_month = datetime(2026, 11, 10, tzinfo=UTC)
    for i in range(3):  # big spenders of last month
        board.apply_cost(CostEvent(id=f"old-{i}", user=f"old-{i}", provider="openai", model="m", usage=Usage(),
                                   cost_usd=5.0, at=last_month))  # fmt: skip
    board.apply_cost(CostEvent(id="new", user="today-user", provider="openai", model="m", usage=Usage(),
                               cost_usd=4.0, at=now - timedelta(minutes=1)))  # fmt: skip
    assert [(s.name, s.today_usd) for s in board.snapshot().spend_by_user] == [("today-user", 4.0)]

    def stats(replica: str, at: datetime, entries: int) -> CacheStats:
        return CacheStats(hits=1, misses=1, entries=entries, evictions=0, bytes=0, replica=replica, at=at)

    board.apply_control(stats("gone:1", now - timedelta(minutes=10), 400))
    board.apply_control(stats("live:2", now - timedelta(seconds=5), 3))
    cache = board.snapshot().cache
    assert (cache.entries, cache.hits, cache.misses) == (3, 1, 1)

    board.apply_control(SetBudget(scope="user:x", weekly_usd=-5.0, at=now))  # the gate refuses this one
    assert not [b for b in board.snapshot().budgets if b.scope == "user:x"]


async def test_login_refuses_oversized_and_non_form_bodies_and_a_removed_operators_session_ends(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    async with dashboard_server(emulator, "dash-hard.", tmp_path) as (_, server):
        base = server.dashboard_url
        async with httpx.AsyncClient(follow_redirects=False) as http:
            huge = await http.post(
                base + "login",
                content=b"key=" + b"A" * 1_000_000,
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert huge.status_code == 413
            text_plain = {"content-type": "text/plain"}
            plain = await http.post(base + "login", content=f"key={OPERATOR_KEY}", headers=text_plain)
            assert plain.status_code == 415 and SESSION_COOKIE not in plain.cookies
            page = await http.get(base)
            assert (
                page.headers["x-frame-options"] == "DENY"
                and "default-src 'self'" in page.headers["content-security-policy"]
            )
            logged_in = await http.post(base + "login", data={"key": OPERATOR_KEY})
            assert logged_in.status_code == 303
            assert (await http.get(base + "state")).status_code == 200
            # The key file loses the operator (a restart with a shared secret): the old cookie opens nothing.
            from pipeline.serve.keys import ApiKeys

            assert server.api_keys is not None
            server.api_keys._operators.clear()  # as a key file without her would read
            assert (await http.get(base + "state")).status_code == 401
            assert not ApiKeys({"k": "u"}).is_operator("ops-anna")
