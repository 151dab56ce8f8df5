"""Nothing lost across restarts of `aipipe run` on the embedded broker (DESIGN A11): the archive and restore.

Each test runs the real `aipipe run --emulate` (embedded broker, every stage and
the archive) as an OS process against an emulator inside the test, stops it
(SIGTERM or kill -9) and starts it again, and checks what users see: budget
limits and spend, the strategy, the cost history, one answer per request id,
a clean `aipipe audit`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.bus.kafka import EMBEDDED_PARTITIONS, KafkaBus, KafkaSettings
from pipeline.bus.protocol import Outgoing
from pipeline.bus.topics import Topics
from pipeline.client.pipeline_client import PipelineClient
from pipeline.emulator import EmulatorServer, parse_profile
from pipeline.runtime.runner import publish_with_retry
from schemas.request import AIRequest

pytestmark = [pytest.mark.timeout(300)]

AIPIPE = [sys.executable, "-m", "pipeline.cli"]
T = Topics("ai.")


def _env(home: Path, emulator_url: str, **extra: str) -> dict[str, str]:
    drop = ("AIPIPE_", "OPENAI_", "ANTHROPIC_", "CLOUDFLARE_", "OTEL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        AIPIPE_HOME=str(home),
        AIPIPE_EMULATE="1",
        AIPIPE_EMULATOR_URL=emulator_url,
        AIPIPE_KAFKA_SESSION_TIMEOUT_MS="2000",
        AIPIPE_DRAIN_GRACE_S="2",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Run:
    """One `aipipe run --emulate` process and its log."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*AIPIPE, "run", "--emulate", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.env = env

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def ready(self, timeout_s: float = 60) -> str:
        """Wait for 'aipipe running on'; the broker's address."""
        await _wait_for(lambda: "aipipe running on" in self.log(), "aipipe run to start", self, timeout_s)
        return (Path(self.env["AIPIPE_HOME"]) / "broker").read_text().strip()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def _wait_for(
    predicate: Callable[[], Any],
    what: str,
    run: Run | None,
    timeout_s: float = 60,
    tick: Callable[[], Any] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tick is not None:
            await tick()
        found = predicate()
        if found:
            return found
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"aipipe run exited ({run.proc.returncode}) before {what}:\n{run.log()[-4000:]}")
        await anyio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{run.log()[-4000:]}" if run else ""))


def _cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*AIPIPE, *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"aipipe {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


class Client:
    """Publishes requests to the broker `aipipe run` started and collects every response (all of them, by id)."""

    def __init__(self, address: str, responses: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.bus = KafkaBus(address, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
        self.responses: dict[str, list[dict[str, Any]]] = {} if responses is None else responses
        self._reader: Any = None

    async def __aenter__(self) -> Client:
        await self.bus.start()
        self._reader = await self.bus.consumer([T.responses], group=None, from_beginning=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._reader.stop()
        await self.bus.stop()

    async def send(
        self, rid: str, *, user: str = "alice", timeout_ms: int = 60_000, providers: list[str] | None = None
    ) -> None:
        body: dict[str, Any] = {
            "id": rid,
            "model": "gpt-3.5-turbo",
            "prompt": f"{rid}: name a colour",
            "max_tokens": 16,
            "user": user,
            "timeout_ms": timeout_ms,
        }
        if providers:
            body["providers"] = providers
        await self.bus.publish(Outgoing(topic=T.requests, value=json.dumps(body).encode(), key=rid.encode()))

    async def send_with_retry(self, rid: str) -> None:
        """Publish, retrying while the broker restarts (a rotation), as ``PipelineClient`` does."""
        body = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"{rid}: name a colour", "max_tokens": 16}
        await publish_with_retry(
            self.bus, Outgoing(topic=T.requests, value=json.dumps(body).encode(), key=rid.encode())
        )

    async def pump(self) -> None:
        for record in await self._reader.getmany(20, max_records=5000):
            value = json.loads(record.value)
            self.responses.setdefault(value["id"], []).append(value)

    async def answers(self, ids: list[str], run: Run, timeout_s: float = 60) -> None:
        await _wait_for(
            lambda: all(i in self.responses for i in ids), f"answers to {len(ids)} ids", run, timeout_s, tick=self.pump
        )


def _profile(latency_ms: int) -> Any:
    """An emulator profile: every provider answers after ``latency_ms``."""
    return parse_profile(
        {
            "providers": {
                p: {"latency": {"dist": "fixed", "ms": latency_ms}} for p in ("openai", "anthropic", "cloudflare")
            }
        }
    )


def _pending(emu: EmulatorServer) -> int:
    return sum(1 for c in emu.calls() if c.outcome == "pending")


async def test_sigterm_then_restart_keeps_budget_strategy_costs_and_answers_each_request_once(tmp_path: Path) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    profile = _profile(20)
    async with EmulatorServer(profile=profile) as emu:
        env = _env(tmp_path / "home", emu.url)
        first = Run(env, tmp_path / "run1.log")
        try:
            address = await first.ready()
            _cli(env, "budget", "set", "user:alice", "--daily", "5")
            _cli(env, "strategy", "set", "round-robin")
            served = [f"served-{i}" for i in range(10)]
            held = [f"held-{i}" for i in range(6)]
            async with Client(address) as client:
                for rid in served:
                    await client.send(rid)
                await client.answers(served, first)
                emu.hold(10**6)  # the provider answers nothing more: these are in flight at the SIGTERM
                for rid in held:
                    await client.send(rid)
                await client.send("short-deadline", timeout_ms=4000)
                await _wait_for(lambda: _pending(emu) >= 7, "7 held provider calls", first)
                before = dict(json.loads(_cli(env, "costs", "--json").stdout))
            assert first.stop() == 0, first.log()[-3000:]
        finally:
            if first.proc.poll() is None:
                first.stop(signal.SIGKILL)
        emu.release()
        assert "Traceback" not in first.log(), first.log()
        await anyio.sleep(4.5)  # the short deadline passes while aipipe is down
        calls_before_restart = len(emu.calls())

        second = Run(env, tmp_path / "run2.log")
        try:
            address = await second.ready()
            assert "restored from the archive" in second.log()
            async with Client(address) as client:
                await client.answers([*held, "short-deadline"], second)
                assert all(client.responses[r][0]["status"] == "ok" for r in held), client.responses
                short = client.responses["short-deadline"][0]
                assert short["status"] == "error" and short["error"]["type"] == "timeout", short
                assert not any(r in client.responses for r in served)  # answered before: not again
            new_calls = emu.calls()[calls_before_restart:]
            assert not any("short-deadline" in c.last_user_text for c in new_calls)  # no provider call for it
            assert sum(1 for c in new_calls if c.last_user_text.startswith("held-")) == len(held)

            after = json.loads(_cli(env, "costs", "--json").stdout)
            alice = lambda report: next(b for b in report["budgets"] if b["scope"] == "user:alice")  # noqa: E731
            assert alice(after)["daily"]["limit_usd"] == 5.0
            spent_before = alice(before)["daily"]["spent_usd"]
            assert spent_before > 0
            # the spend of the first run is still counted; the held requests, answered now, add theirs
            assert alice(after)["daily"]["spent_usd"] > spent_before
            strategy = _cli(env, "strategy", "show", "--json").stdout
            assert "round_robin" in strategy, strategy
            audit = json.loads(_cli(env, "audit", "--since", since, "--json").stdout)
            assert audit["clean"], audit
            assert audit["requests"] == audit["responses"] == len(served) + len(held) + 1
            assert audit["cost_events"] == len(served) + len(held)  # exactly one per costed id
            assert second.stop() == 0
        finally:
            if second.proc.poll() is None:
                second.stop(signal.SIGKILL)
        assert "Traceback" not in second.log(), second.log()


async def test_kill_9_loses_at_most_the_last_flush_and_the_archive_audits_after_no_restore(tmp_path: Path) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    profile = _profile(10)
    async with EmulatorServer(profile=profile) as emu:
        env = _env(tmp_path / "home", emu.url)
        first = Run(env, tmp_path / "run1.log")
        sent_at: dict[str, float] = {}
        seen: dict[str, list[dict[str, Any]]] = {}  # every answer any client saw, from either broker
        try:
            address = await first.ready()
            async with Client(address, seen) as client:
                for i in range(120):  # a steady stream, about 100 requests/s, then kill -9 in the middle of it
                    rid = f"k-{i:03d}"
                    await client.send(rid)
                    sent_at[rid] = time.monotonic()
                    if i == 100:
                        await client.pump()
                        first.proc.kill()
                        killed_at = time.monotonic()
                        break
                    await anyio.sleep(0.01)
        finally:
            if first.proc.poll() is None:
                first.stop(signal.SIGKILL)
            first.proc.wait()

        second = Run(env, tmp_path / "run2.log")
        try:
            address = await second.ready()
            async with Client(address, seen) as client:
                early = [r for r, t in sent_at.items() if t < killed_at - 1.0]  # well before the last flush
                # answered before the kill (in the archive) or after the restart (restored): every early one
                await _wait_for(
                    lambda: set(early) <= set(seen) | _archived_answers(env),
                    "the early ids",
                    second,
                    timeout_s=90,
                    tick=client.pump,
                )
                await anyio.sleep(1.0)
                await client.pump()
                lost = [r for r in sent_at if r not in client.responses and r not in _archived_answers(env)]
                # what may be lost: what reached the broker in the last flush interval (200 ms) before the kill
                assert all(sent_at[r] >= killed_at - 1.0 for r in lost), lost
                assert len(lost) <= 60, lost
                print(f"kill -9: {len(lost)} of {len(sent_at)} requests lost (sent in the last second before it)")
            assert second.stop() == 0
        finally:
            if second.proc.poll() is None:
                second.stop(signal.SIGKILL)

        third = Run(env, tmp_path / "run3.log", "--no-restore")
        try:
            await third.ready()
            assert "restored from the archive" not in third.log()
            audit = json.loads(
                _cli(env, "audit", "--since", since, "--source", "archive", "--json", check=False).stdout
            )
            # what was answered is in the archive once; the requests lost with the kill were never archived
            assert audit["conflicting"] == [] and audit["extra_costs"] == [], audit
            assert audit["missing_responses"] == [] and audit["missing_costs"] == [], audit
            assert audit["requests"] >= len(sent_at) - 60
            broker_only = json.loads(_cli(env, "audit", "--since", since, "--source", "broker", "--json").stdout)
            assert broker_only["requests"] == 0  # started empty: the broker holds nothing of before
            assert third.stop() == 0
        finally:
            if third.proc.poll() is None:
                third.stop(signal.SIGKILL)


def _archived_answers(env: dict[str, str]) -> set[str]:
    found = set()
    for path in (Path(env["AIPIPE_HOME"]) / "archive" / T.responses).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                found.add(json.loads(line)["value"]["id"])
            except (ValueError, KeyError):
                continue
    return found


HIGH_LIMITS_TOML = """
[providers.openai]
rate_limit = { requests_per_minute = 1000000, tokens_per_minute = 1000000000 }
[providers.anthropic]
rate_limit = { requests_per_minute = 1000000, tokens_per_minute = 1000000000 }
[providers.cloudflare]
rate_limit = { requests_per_minute = 1000000, tokens_per_minute = 1000000000 }
"""


ROTATION_TOML = (
    """
[broker]
rotate_records = 100
check_interval_s = 0.5
"""
    + HIGH_LIMITS_TOML
)


async def test_rotation_under_traffic_answers_every_request_once_and_loses_no_cost_event(tmp_path: Path) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    config = tmp_path / "aipipe.toml"
    config.write_text(ROTATION_TOML, encoding="utf-8")
    profile = _profile(20)
    async with EmulatorServer(profile=profile) as emu:
        env = _env(tmp_path / "home", emu.url, AIPIPE_CONFIG=str(config))
        run = Run(env, tmp_path / "run.log")
        ids = [f"rot-{i:04d}" for i in range(450)]
        answers: dict[str, str] = {}
        try:
            address = await run.ready()
            bus = KafkaBus(address, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
            await bus.start()
            try:
                client = PipelineClient(bus, T)  # what `aipipe send`, `serve` and the manager use
                async with anyio.create_task_group() as tg:
                    await tg.start(client.run)

                    async def ask(rid: str) -> None:
                        request = AIRequest(
                            id=rid, model="gpt-3.5-turbo", prompt=f"{rid}: name a colour", max_tokens=16
                        )
                        answers[rid] = (await client.request(request, timeout_s=90)).status

                    async with anyio.create_task_group() as asking:
                        for rid in ids:  # a steady stream of about 50 requests/s while the broker rotates
                            asking.start_soon(ask, rid)
                            await anyio.sleep(0.02)
                    client.stop()
                    tg.cancel_scope.cancel()
            finally:
                await bus.stop()
            assert "rotated the embedded broker" in run.log()
            assert sorted(answers) == ids and set(answers.values()) == {"ok"}
            print(f"client: {client.resent} request(s) published again after a rotation")
            assert run.stop() == 0
        finally:
            if run.proc.poll() is None:
                run.stop(signal.SIGKILL)
        log = run.log()
        assert "Traceback" not in log, log[-5000:]
        pauses = [
            float(line.split("rotated the embedded broker in ")[1].split(" s")[0])
            for line in log.splitlines()
            if "rotated the embedded broker in " in line
        ]
        print(f"rotations: {len(pauses)}, intake paused {pauses} s")
        audit = json.loads(_cli(env, "audit", "--since", since, "--source", "archive", "--json", check=False).stdout)
        # Known gap (closing note of issue 20): under load a rotation can leave the first records of the new
        # broker unarchived (seen: 30 of 450 requests, each answered once after the client's republish).
        assert audit["requests"] >= 0.9 * len(ids), audit
        assert audit["responses"] == len(ids), audit
        assert audit["missing_responses"] == [] and audit["conflicting"] == [], audit
        assert audit["duplicate_responses"] == [], audit  # answered once, across every broker
        assert audit["missing_costs"] == [] and audit["extra_costs"] == [], audit
        assert audit["cost_events"] == len(ids)


async def test_audit_lists_the_provider_calls_a_killed_executor_made_again(tmp_path: Path) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    config = tmp_path / "aipipe.toml"
    config.write_text(HIGH_LIMITS_TOML, encoding="utf-8")
    profile = _profile(60)
    async with EmulatorServer(profile=profile) as emu:
        env = _env(tmp_path / "home", emu.url, AIPIPE_CONFIG=str(config))
        others = [s for s in ("cache", "budget", "router", "recorder", "breaker", "health", "archive")]
        rest = Run(env, tmp_path / "rest.log", *[a for s in others for a in ("--stage", s)])
        executor: Run | None = None
        ids = [f"x-{i:04d}" for i in range(200)]
        try:
            address = await rest.ready()
            executor = Run(env, tmp_path / "executor-1.log", "--stage", "executor")
            await executor.ready()
            async with Client(address) as client:
                # One request per partition of the executor's topic waits at a held provider: nothing
                # after it in its partition can be committed, however soon it is answered.
                blockers: dict[int, str] = {}
                n = 0
                while len(blockers) < EMBEDDED_PARTITIONS:
                    rid = f"blocker-{n}"
                    blockers.setdefault(await client.bus.partition_for(T.stage_execute, rid.encode()), rid)
                    n += 1
                emu.hold(10**6, provider="openai")
                for rid in blockers.values():
                    await client.send(rid, providers=["openai"])
                await _wait_for(lambda: _pending(emu) >= EMBEDDED_PARTITIONS, "a held call per partition", rest)
                for rid in ids:
                    await client.send(rid, providers=["cloudflare"])
                await _wait_for(lambda: len(client.responses) >= 100, "100 answers", rest, tick=client.pump)
                executor.proc.kill()  # with 100+ answered calls not committed
                executor.proc.wait()
                emu.release()
                executor = Run(env, tmp_path / "executor-2.log", "--stage", "executor")
                ids += list(blockers.values())
                await client.answers(ids, rest, timeout_s=120)
            audit = json.loads(_cli(env, "audit", "--since", since, "--json").stdout)
            assert audit["clean"] and audit["requests"] == len(ids), audit
            calls = audit["calls"]
            made = sum(c["calls"] for c in calls.values())
            answered = sum(c["answered"] for c in calls.values())
            repeated = sum(c["repeated_calls"] for c in calls.values())
            completed = sum(1 for c in emu.calls() if c.outcome == "ok")
            print(
                f"executor kill -9: {completed} provider calls answered by the emulator for {len(ids)} requests; "
                f"audit: {made} calls with usage, {answered} answered, {repeated} repeated "
                f"(${sum(c['repeated_usd'] for c in calls.values()):.8f})"
            )
            assert answered == len(ids)  # the ledger: one cost per request
            assert made == answered + repeated  # every call with usage is a ledger line or a repeat
            assert made <= completed  # a call the killed executor never heard back from is not seen
            assert (
                repeated >= 100 - EMBEDDED_PARTITIONS and len(audit["repeated_call_ids"]) == repeated
            )  # each answered one, again
            assert all(c["repeated_usd"] > 0 for c in calls.values() if c["repeated_calls"])
        finally:
            for run in (executor, rest):
                if run is not None and run.proc.poll() is None:
                    run.stop()
