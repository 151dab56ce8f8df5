"""``aipipe demo`` / ``make demo``: the whole pipeline on real prompts, with a results table.

Starts a private embedded broker, the provider emulator and every stage in
this process, then sends MT-Bench questions (``pipeline/data/``) and shows:

* failover: the emulator answers Cloudflare's first calls with 429 and
  ``Retry-After: 60``, longer than ``retry.max_delay_ms`` allows, so those
  requests fall back to the next provider at once;
* cache hits: a few questions are asked again and answered from the cache;
* streaming: one answer streamed to the terminal as it is generated, and one
  stream cut by the emulator mid-answer and resumed on the next provider
  (``pipeline.cli.demo.stream_moment``);
* a circuit that opens and closes: Anthropic answers 529 twice, its circuit
  opens, the next request skips it, the health monitor's probes close it
  after a 1 s cool-off (``pipeline.cli.demo.circuit_moment``);
* a strategy switch: ``set_strategy round_robin`` is published on ``ai.control``
  and the next requests rotate over every provider;
* a budget that refuses: a user's daily budget holds one request's worst case
  and a half; three requests sent at once get one answer, the rest
  ``budget_exceeded`` (``pipeline.cli.demo.budget_moment``);
* costs: every answered request is priced from the price table.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from rich.console import Console
from rich.status import Status
from rich.table import Table

from pipeline.assembly.build import ALL_STAGES, Pipeline
from pipeline.assembly.process import open_bus
from pipeline.cli.demo.budget_moment import budget_moment
from pipeline.cli.demo.circuit_moment import DEMO_CIRCUIT_CONFIG, circuit_moment
from pipeline.cli.demo.stream_moment import FoldedWriter, stream_moment
from pipeline.client.pipeline_client import PipelineClient
from pipeline.client.strategy_control import publish_strategy, wait_applied
from pipeline.data.prompts import load_prompts, spread_by_category
from pipeline.emulator import EmulatorServer
from pipeline.runtime.asgi import bind_tcp
from pipeline.runtime.config import config_from_mapping, preset
from pipeline.runtime.endpoints import resolve_endpoints
from pipeline.runtime.settings import Settings
from pipeline.runtime.signals import drain_on_signal
from pipeline.serve.dashboard import open_dashboard
from pipeline.serve.dashboard_server import DEFAULT_DASHBOARD_PORT, serve_dashboard, stop_dashboard
from pipeline.serve.keys import ApiKeys
from schemas.request import AIRequest, CacheOptions
from schemas.response import AIResponse
from stages.rules.strategies import StrategySpec

log = logging.getLogger("aipipe.demo")

#: Cloudflare calls the emulator refuses with 429 + Retry-After 60 s at the start of the demo.
DEMO_RATE_LIMITED_CALLS = 3


def _attempts_text(response: AIResponse, *, short: bool = False) -> str:
    """The attempts chain: ``openai:ok``, ``anthropic:server_error(529)``, ``cloudflare:skipped(...)``."""
    if not response.attempts:
        return "-"
    parts = []
    for a in response.attempts:
        if a.outcome == "ok":
            result = "ok"
        elif a.outcome == "skipped":
            result = "skip" if short else f"skipped({a.error_type})"
        else:
            result = f"{a.status_code or a.error_type}" if short else f"{a.error_type}({a.status_code or '-'})"
        parts.append(f"{a.provider}:{result}")
    return (">" if short else " → ").join(parts)


#: Below this terminal width the table drops the phase and latency columns and shortens the attempts.
WIDE_COLUMNS = 120


def _table(rows: list[tuple[str, AIRequest, AIResponse]], width: int = WIDE_COLUMNS) -> Table:
    """The results table; on a terminal narrower than ``WIDE_COLUMNS`` it keeps to the essentials (80 fit)."""
    wide = width >= WIDE_COLUMNS
    table = Table(title="aipipe demo: responses", show_lines=False, pad_edge=wide, collapse_padding=not wide)
    columns: tuple[str, ...] = (
        "id",
        "phase",
        "model",
        "provider",
        "cached",
        "cost (USD)",
        "latency",
        "status",
        "attempts",
    )
    if not wide:
        columns = ("id", "provider", "cost $", "status", "attempts")
    for col in columns:
        table.add_column(col, overflow="fold")
    for phase, req, resp in rows:
        status = resp.status if resp.status == "ok" else f"error: {resp.error.type if resp.error else '?'}"
        if wide:
            table.add_row(
                resp.id,
                phase,
                req.model,
                resp.provider or "-",
                "yes" if resp.cached else "",
                f"{resp.cost_usd:.8f}",
                f"{resp.latency_ms:.0f} ms",
                status,
                _attempts_text(resp),
            )
        else:
            cost = "cached" if resp.cached else f"{resp.cost_usd:.6f}"
            table.add_row(
                resp.id.removeprefix("demo-"),
                resp.provider or "-",
                cost,
                "ok" if resp.status == "ok" else status.removeprefix("error: "),
                _attempts_text(resp, short=True),
            )
    return table


@asynccontextmanager
async def _progress(console: Console) -> AsyncIterator[Status]:
    """A spinner with the responses so far while the demo runs (on a terminal; nothing is left behind)."""
    with console.status("starting the embedded broker, the emulator and the stages ...") as status:
        yield status


def _dashboard_socket(port: int) -> socket.socket:
    """A socket on 127.0.0.1 for the demo's dashboard: ``port``, or any free one when it is taken."""
    try:
        return bind_tcp("127.0.0.1", port)
    except OSError:
        return bind_tcp("127.0.0.1", 0)


async def run_demo(
    *,
    count: int = 12,
    json_out: bool = False,
    env: dict[str, str] | None = None,
    keep: bool = False,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
) -> int:
    """Run the demo; returns the exit code (0 when every request got a response and the moments showed).

    The operator dashboard is served on ``dashboard_port`` (or a free port when it is taken) while the
    demo runs, open (no login) unless ``AIPIPE_API_KEYS`` names a key file; with ``keep`` the stages and
    the dashboard stay up after the table until SIGINT/SIGTERM.

    Raises:
        BusError: when the embedded broker cannot start.
    """
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 150)
    env = dict(os.environ if env is None else env)
    env["AIPIPE_EMULATE"] = "1"
    env.pop("AIPIPE_KAFKA_BOOTSTRAP", None)
    settings = Settings.from_env(env, env_name="production")
    config = config_from_mapping(DEMO_CIRCUIT_CONFIG, base=preset("production"))  # small breaker settings
    prompts = spread_by_category(load_prompts("mt_bench"), max(count, 6))
    started = time.perf_counter()
    rows: list[tuple[str, AIRequest, AIResponse]] = []
    async with (
        _progress(console) as status,
        open_bus("kafka", env, start_broker=True, force_new_broker=True) as opened,
        EmulatorServer() as emulator,
    ):
        console.print(f"[bold]aipipe demo[/]: embedded broker at {opened.bootstrap}, emulator at {emulator.url}")
        resolved = resolve_endpoints(settings, config, emulator.url)
        emulator.faults.schedule("cloudflare", *[{"status": 429, "retry_after_s": 60}] * DEMO_RATE_LIMITED_CALLS)
        async with (
            Pipeline(settings, resolved, opened.bus, stages=ALL_STAGES) as pipeline,
            anyio.create_task_group() as tg,
        ):
            client = PipelineClient(opened.bus, settings.topics)
            await tg.start(client.run)
            keys = ApiKeys.from_file(settings.api_keys_path) if settings.api_keys_path is not None else None
            feed, dashboard = open_dashboard(
                opened.bus, settings.topics, resolved.config, keys, env, bootstrap=opened.bootstrap
            )
            await tg.start(feed.run)
            dashboard_server, dashboard_url = await serve_dashboard(tg, dashboard, _dashboard_socket(dashboard_port))
            console.print(f"[bold]operator dashboard[/]: {dashboard_url}/dashboard/ (live while the demo runs)")

            async def ask(phase: str, request: AIRequest) -> None:
                rows.append((phase, request, await client.request(request)))
                status.update(f"{len(rows)} responses so far ({phase})")

            models = ["gpt-3.5-turbo", "chat-small", "chat-large"]
            pool = [  # the first `count` are sent first; the moments below use up to 6
                AIRequest(
                    id=f"demo-{i + 1:02d}",
                    model=models[i % len(models)],
                    prompt=p.turns[0],
                    max_tokens=256,
                    temperature=0.7,
                    user=f"user-{i % 3}",
                )
                for i, p in enumerate(prompts[: max(count, 6)])
            ]
            first = pool[:count]
            console.print(f"sending {len(first)} requests (MT-Bench questions) ...")
            async with anyio.create_task_group() as batch:
                for request in first:
                    batch.start_soon(ask, "first", request)
            repeats = [msgspec.structs.replace(r, id=f"{r.id}-again") for r in first[:3]]
            console.print(f"asking {len(repeats)} of them again (served from the cache) ...")
            async with anyio.create_task_group() as batch:
                for request in repeats:
                    batch.start_soon(ask, "repeat", request)

            console.print("streaming: one answer as it arrives, then one cut mid-answer and resumed ...")
            status.stop()  # the spinner would redraw over a half-written line
            streamed = await stream_moment(
                client,
                emulator,
                pool[3:5],
                FoldedWriter(
                    lambda text: console.print(text, end="", soft_wrap=True, highlight=False, markup=False),
                    console.width,
                ),
            )
            status.start()

            async def ask_one(phase: str, request: AIRequest) -> AIResponse:
                response = await client.request(request)
                rows.append((phase, request, response))
                status.update(f"{len(rows)} responses so far ({phase})")
                return response

            console.print("circuit breaker: anthropic answers 529 twice; its circuit opens, is skipped, closes ...")
            moment = await circuit_moment(pipeline, emulator, ask_one, pool)
            event = await publish_strategy(opened.bus, settings.topics, StrategySpec("round_robin"))
            await wait_applied(pipeline.strategy, event)
            switched = [msgspec.structs.replace(r, id=f"{r.id}-rr", cache=CacheOptions(bypass=True)) for r in pool[:6]]
            console.print(f"switching to round_robin (set_strategy on ai.control); sending {len(switched)} ...")
            for request in switched:  # one at a time, so the table shows the rotation in order
                await ask("round_robin", request)
            console.print("budget: a user's daily budget fits 1.5 requests; 3 sent at once ...")
            budget = await budget_moment(opened.bus, settings.topics, pipeline, ask_one, pool)
            client.stop()
            status.stop()
            code = _report(
                console, rows, json_out=json_out, started=started, moment=moment, budget=budget, streamed=streamed
            )
            if keep:
                console.print(
                    f"[bold]operator dashboard[/] still at {dashboard_url}/dashboard/ with the stages running "
                    "(--keep); Ctrl-C to stop"
                )
                stopping = anyio.Event()
                tg.start_soon(drain_on_signal, stopping.set, "the demo")
                await stopping.wait()
            await stop_dashboard(dashboard_server)
            tg.cancel_scope.cancel()
    return code


def _report(
    console: Console,
    rows: list[tuple[str, AIRequest, AIResponse]],
    *,
    json_out: bool,
    started: float,
    moment: Any,
    budget: Any,
    streamed: Any,
) -> int:
    """Print the results table (or JSON lines) and the summary; 0 when every moment showed, else 1."""
    phase_order = {"first": 0, "repeat": 1, "circuit": 2, "round_robin": 3, "budget": 4}
    rows.sort(key=lambda r: (phase_order.get(r[0], 9), r[2].id))
    if json_out:
        for _, _, resp in rows:
            print(msgspec.json.encode(resp).decode())
    else:
        console.print(_table(rows, console.width))
    ok = [r for _, _, r in rows if r.status == "ok"]
    hits = [r for r in ok if r.cached]
    fallbacks = [r for r in ok if len({a.provider for a in r.attempts}) > 1]
    total_cost = sum(r.cost_usd for r in ok)
    latencies = [r.latency_ms for r in ok if not r.cached]
    summary: dict[str, Any] = {
        "requests": len(rows),
        "ok": len(ok),
        "errors": len(rows) - len(ok),
        "cache_hits": len(hits),
        "fallbacks": len(fallbacks),
        "total_cost_usd": round(total_cost, 10),
        "p50_latency_ms": round(statistics.median(latencies), 1) if latencies else None,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    console.print(
        f"[bold]summary[/]: {summary['ok']}/{summary['requests']} answered, {summary['errors']} errors, "
        f"{summary['cache_hits']} cache hits, {summary['fallbacks']} answered after failover, "
        f"total cost ${total_cost:.8f}, p50 latency {summary['p50_latency_ms']} ms (uncached), "
        f"wall time {summary['wall_s']} s"
    )
    rotation = [r.provider or "-" for phase, _, r in rows if phase == "round_robin"]
    console.print(f"[bold]strategy switch[/]: after set_strategy round_robin, answers came from {' → '.join(rotation)}")
    rotated = set(rotation) - {"-"}
    console.print(f"[bold]circuit breaker[/]: {moment.provider}'s circuit on ai.control (aipipe tail control):")
    for line in moment.lines() or ["  (no transition seen)"]:
        console.print(line, highlight=False)
    console.print(budget.line())
    console.print(streamed.line())
    shown = (
        len(ok) == len(rows) - len(budget.refused)
        and budget.shown
        and hits
        and fallbacks
        and len(rotated) >= 2
        and moment.shown
        and streamed.shown
        and all(r.cost_usd > 0 for r in ok if not r.cached)
    )
    return 0 if shown else 1
