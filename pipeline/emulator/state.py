"""The emulator's mutable state: fault rules, call log, hold gate. Shared by Python and HTTP control.

All methods run on the event loop that serves the emulator (they are plain
synchronous mutations, or coroutines where they wait), so no locking is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import Struct

from pipeline.emulator.spec import (
    PROVIDERS,
    FaultProfile,
    FaultRule,
    FaultStep,
    FixedLatency,
    NormalLatency,
    Provider,
    ProviderFaults,
    UniformLatency,
    parse_profile,
)

Outcome = Literal[
    "pending",
    "ok",
    "error",
    "hang",
    "reset",
    "malformed_json",
    "empty_content",
    "invalid_json_schema",
    "stream_cut",
    "stream_stall",
    "stream_malformed",
    "client_disconnected",
]


class CallRecord(Struct, kw_only=True):
    """One provider call the emulator received.

    Times are Unix epoch seconds. ``status`` is the HTTP status sent (``None``
    while the call is in flight, and for ``hang`` calls the client left and
    ``reset`` calls, which get no answer). ``error_kind`` names the error body
    sent. The request summary never includes headers (so no credentials):
    ``message_count``, ``roles``, ``max_tokens``, ``temperature`` and the first
    200 characters of the last user message. For a streamed call: ``stream``,
    ``continuation`` (it continued an earlier partial answer) and
    ``chunks_sent`` (content deltas sent).

    Tools, images and structured output (DESIGN A4): ``tools_offered`` (the
    request offered tools; ``tool_count`` of them), ``tool_call`` (the answer
    was a tool call; ``tool_names`` the tools it called), ``tool_results``
    (tool results the request ended with), ``images`` (images in the
    request) and ``response_format`` (``json_object``, ``json_schema`` or
    ``None``; the answer was JSON unless it was a tool call).
    """

    seq: int
    provider: Provider
    model: str
    path: str
    arrived_at: float
    finished_at: float | None = None
    status: int | None = None
    outcome: Outcome = "pending"
    error_kind: str | None = None
    held: bool = False
    message_count: int = 0
    roles: list[str] = []
    max_tokens: int | None = None
    temperature: float | None = None
    last_user_text: str = ""
    stream: bool = False
    continuation: bool = False
    chunks_sent: int = 0
    tools_offered: bool = False
    tool_count: int = 0
    tool_call: bool = False
    tool_names: list[str] = []
    tool_results: int = 0
    images: int = 0
    response_format: str | None = None

    def finish(self, outcome: Outcome, status: int | None, error_kind: str | None = None) -> None:
        """Mark the call answered (or abandoned) now."""
        self.outcome = outcome
        self.status = status
        self.error_kind = error_kind
        self.finished_at = time.time()


def _copy_profile(profile: FaultProfile | Mapping[str, Any] | None) -> FaultProfile:
    if profile is None:
        return FaultProfile()
    data = msgspec.to_builtins(profile) if isinstance(profile, FaultProfile) else dict(profile)
    return parse_profile(data)


_RuleT = TypeVar("_RuleT", bound=FaultRule)


def _as_rule(rule: FaultRule | Mapping[str, Any], cls: type[_RuleT]) -> _RuleT:
    data = msgspec.to_builtins(rule) if isinstance(rule, FaultRule) else dict(rule)
    return msgspec.convert(data, cls, str_keys=True)


def _as_step(step: FaultStep | Mapping[str, Any]) -> FaultStep:
    return step if isinstance(step, FaultStep) else msgspec.convert(dict(step), FaultStep, str_keys=True)


_NORMAL = FaultStep(action="ok")
_NO_FAULTS = ProviderFaults()
#: A target name: a built-in provider or a deployment (same rule as deployment names, DESIGN A10).
TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class FaultController:
    """Live fault rules of the emulator (the ``FaultProfile`` of ``pipeline.emulator.spec``).

    Every method accepts spec structs or the equivalent dicts (validated with
    ``msgspec``, so a bad field raises ``msgspec.ValidationError`` with its path).

    Args:
        profile: initial rules (``None``: no faults).
    """

    def __init__(self, profile: FaultProfile | Mapping[str, Any] | None = None) -> None:
        self._profile = _copy_profile(profile)
        self._rng = random.Random(self._profile.seed or 0)

    def load(self, profile: FaultProfile | Mapping[str, Any] | None) -> None:
        """Replace every rule with ``profile`` (``None`` clears all) and reseed the RNG.

        Raises:
            msgspec.ValidationError: when a dict does not match ``FaultProfile``.
        """
        self._profile = _copy_profile(profile)
        self._rng = random.Random(self._profile.seed or 0)

    def profile(self) -> FaultProfile:
        """A copy of the current rules; schedules show only the steps not yet used."""
        return _copy_profile(self._profile)

    def reply_words(self) -> int | None:
        """Words in every answer's body (``None``: the emulator's default)."""
        return self._profile.reply_words

    def _provider(self, provider: Provider) -> ProviderFaults:
        if not TARGET_NAME.match(provider):
            raise ValueError(f"invalid target name {provider!r}: a provider ({', '.join(PROVIDERS)}) or a deployment")
        faults = self._profile.providers.get(provider)
        if faults is None:
            faults = ProviderFaults()
            self._profile.providers[provider] = faults
        return faults

    def dialect(self, provider: Provider) -> ProviderFaults:
        """The rules of ``provider`` (for its ``omit_usage`` and ``error_body``), empty when it has none."""
        return self._profile.providers.get(provider) or _NO_FAULTS

    def set(self, provider: Provider, rule: FaultRule | Mapping[str, Any] | None, *, model: str | None = None) -> None:
        """Replace the rule of ``provider`` (or of one ``model`` of it); ``None`` removes it.

        Example: ``faults.set("openai", {"probabilities": {"500": 0.2}, "latency": {"dist": "fixed", "ms": 5}})``.

        Raises:
            ValueError: for an invalid target name.
            msgspec.ValidationError: when ``rule`` is not a valid ``FaultRule``/``ProviderFaults``.
        """
        faults = self._provider(provider)
        if model is not None:
            if rule is None:
                faults.models.pop(model, None)
            else:
                faults.models[model] = _as_rule(rule, FaultRule)
            return
        models = faults.models
        if rule is None:
            self._profile.providers[provider] = ProviderFaults(models=models)
            return
        new = _as_rule(rule, ProviderFaults)
        if not new.models:
            new.models = models
        self._profile.providers[provider] = new

    def schedule(self, provider: Provider, *steps: FaultStep | Mapping[str, Any], model: str | None = None) -> None:
        """Append ``steps`` to the queue of ``provider`` (or of one ``model``); each answers one call, in order.

        Example: ``faults.schedule("anthropic", {"status": 529}, {"status": 429, "retry_after_s": 1})``.

        Raises:
            ValueError: for an invalid target name.
            msgspec.ValidationError: when a step is not a valid ``FaultStep``.
        """
        faults = self._provider(provider)
        target: FaultRule = faults if model is None else faults.models.setdefault(model, FaultRule())
        target.schedule.extend(_as_step(s) for s in steps)

    def clear(self, provider: Provider | None = None) -> None:
        """Remove every rule (of one provider, or of all); the seed is kept."""
        if provider is None:
            self._profile.providers.clear()
        else:
            self._profile.providers.pop(provider, None)

    def pending(self, provider: Provider, model: str | None = None) -> int:
        """Scheduled steps not yet used, for ``provider`` (or only its ``model`` queue)."""
        faults = self._profile.providers.get(provider)
        if faults is None:
            return 0
        if model is None:
            return len(faults.schedule) + sum(len(r.schedule) for r in faults.models.values())
        rule = faults.models.get(model)
        return len(rule.schedule) if rule else 0

    def extra_models(self, provider: Provider) -> list[str]:
        """Model ids the profile adds for ``provider``."""
        return list(self._profile.extra_models.get(provider, ()))

    def next_step(self, provider: Provider, model: str) -> FaultStep:
        """Choose what the next call to ``provider``/``model`` gets (rules in ``spec``'s docstring)."""
        faults = self._profile.providers.get(provider)
        if faults is None:
            return _NORMAL
        model_rule = faults.models.get(model)
        for rule in (model_rule, faults):
            if rule is not None and rule.schedule:
                return rule.schedule.pop(0)
        probabilities = model_rule.probabilities if model_rule and model_rule.probabilities else faults.probabilities
        if probabilities:
            draw = self._rng.random()
            cumulative = 0.0
            for key in sorted(probabilities):
                cumulative += probabilities[key]
                if draw < cumulative:
                    return FaultStep(status=int(key)) if key.isdigit() else FaultStep(action=key)  # type: ignore[arg-type]
        for rule in (model_rule, faults):
            if rule is not None and rule.default is not None:
                return rule.default
        return _NORMAL

    def latency_s(self, provider: Provider, model: str, step: FaultStep) -> float:
        """The delay before answering (s): the step's, else the model's, else the provider's latency."""
        if step.latency_ms is not None:
            return step.latency_ms / 1000.0
        faults = self._profile.providers.get(provider)
        if faults is None:
            return 0.0
        model_rule = faults.models.get(model)
        latency = model_rule.latency if model_rule and model_rule.latency is not None else faults.latency
        match latency:
            case None:
                return 0.0
            case FixedLatency(ms=ms):
                return ms / 1000.0
            case UniformLatency(min_ms=lo, max_ms=hi):
                return self._rng.uniform(lo, hi) / 1000.0
            case NormalLatency(mean_ms=mean, stddev_ms=sd):
                return max(0.0, self._rng.gauss(mean, sd)) / 1000.0
        return 0.0


class _Hold:
    def __init__(self, n: int, provider: Provider | None) -> None:
        self.n = n
        self.provider = provider
        self.arrived = 0
        self.event = asyncio.Event()


class EmulatorState:
    """Everything the emulator's handlers and its controllers share.

    Args:
        profile: the fault profile to start with (and to return to on ``reset``).
    """

    def __init__(self, profile: FaultProfile | Mapping[str, Any] | None = None) -> None:
        self._initial = _copy_profile(profile)
        self.faults = FaultController(self._initial)
        self._calls: list[CallRecord] = []
        # Kept as calls arrive: every answer reports the provider's count (rate-limit headers), and
        # counting the log each time made a call cost O(calls so far) (``aipipe bench``: 0.6 ms per
        # call at the start of a run, 2.5 ms after 40,000 calls).
        self._counts: dict[str, int] = dict.fromkeys(PROVIDERS, 0)
        self._seq = 0
        self._hold: _Hold | None = None
        self._changed: asyncio.Condition | None = None
        self._stopping: asyncio.Event | None = None

    # --- lazily created loop objects (the state may be built outside the loop) ---

    @property
    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the server shuts down: held and hanging calls stop waiting."""
        if self._stopping is None:
            self._stopping = asyncio.Event()
        return self._stopping

    # --- call log ---

    async def arrive(self, record_fields: Mapping[str, Any]) -> CallRecord:
        """Log a call that just arrived and wake ``wait_for_calls`` waiters."""
        self._seq += 1
        record = msgspec.convert({**record_fields, "seq": self._seq, "arrived_at": time.time()}, CallRecord)
        self._calls.append(record)
        self._counts[record.provider] = self._counts.get(record.provider, 0) + 1
        await self.notify()
        return record

    async def notify(self) -> None:
        """Wake ``wait_for_calls`` waiters (after a call arrived or finished)."""
        async with self._cond:
            self._cond.notify_all()

    def calls(self, provider: Provider | None = None) -> list[CallRecord]:
        """The calls received so far, oldest first (of one provider, or all)."""
        return [c for c in self._calls if provider is None or c.provider == provider]

    def counts(self) -> dict[str, int]:
        """Calls received per provider (every provider listed, 0 included)."""
        return dict(self._counts)

    def clear_calls(self) -> None:
        """Forget the call log and counters (faults and holds are kept)."""
        self._calls.clear()
        self._counts = dict.fromkeys(PROVIDERS, 0)

    def reset(self) -> None:
        """Back to the start: empty call log, holds released, faults as the initial profile."""
        self.clear_calls()
        self.release()
        self.faults.load(self._initial)

    async def wait_for_calls(
        self, n: int, provider: Provider | None = None, *, timeout_s: float = 5.0, finished: bool = False
    ) -> list[CallRecord]:
        """Wait until at least ``n`` calls (of ``provider``, or any) have arrived, or finished.

        Args:
            n: number of calls to wait for.
            provider: count only this provider's calls.
            timeout_s: how long to wait (s).
            finished: count only calls that got their answer (or were abandoned).

        Returns:
            The matching calls, oldest first.

        Raises:
            TimeoutError: when fewer than ``n`` calls arrived within ``timeout_s``.
        """

        def matching() -> list[CallRecord]:
            return [c for c in self.calls(provider) if not finished or c.outcome != "pending"]

        try:
            async with asyncio.timeout(timeout_s):
                async with self._cond:
                    await self._cond.wait_for(lambda: len(matching()) >= n)
        except TimeoutError:
            got = len(matching())
            raise TimeoutError(
                f"emulator: {got} of {n} {'finished ' if finished else ''}calls"
                f"{f' to {provider}' if provider else ''} after {timeout_s} s"
            ) from None
        return matching()

    # --- hold ---

    def hold(self, n: int, provider: Provider | None = None) -> None:
        """Keep calls (to ``provider``, or any) waiting until ``n`` of them have arrived, or ``release()``.

        The n-th call releases them all at once and the hold ends; a new
        ``hold`` replaces (and first releases) the current one.

        Raises:
            ValueError: when ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"hold needs n >= 1 calls, got {n}")
        self.release()
        self._hold = _Hold(n, provider)

    def release(self) -> int:
        """Let every held call go on now and end the hold. Returns how many calls were held."""
        hold, self._hold = self._hold, None
        if hold is None:
            return 0
        hold.event.set()
        return hold.arrived

    def holding(self) -> int:
        """How many calls the current hold keeps waiting (0 without a hold)."""
        return 0 if self._hold is None or self._hold.event.is_set() else self._hold.arrived

    async def hold_point(self, record: CallRecord) -> None:
        """Called by each arriving provider call: wait here while a matching hold is active."""
        hold = self._hold
        if hold is None or (hold.provider is not None and hold.provider != record.provider):
            return
        hold.arrived += 1
        record.held = True
        if hold.arrived >= hold.n:
            self.release()
            return
        await wait_first(hold.event.wait(), self.stopping.wait())


async def wait_first(*aws: Awaitable[Any], timeout_s: float | None = None) -> int | None:
    """Wait until the first of ``aws`` completes; the others are cancelled.

    Returns:
        The index (in ``aws``) of the first to complete, or ``None`` if
        ``timeout_s`` (s) ran out first.
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    for i, t in enumerate(tasks):
        if t in done:
            return i
    return None


def summarize(messages: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Request summary fields of a ``CallRecord`` from ``(role, text)`` pairs (no headers, no keys)."""
    pairs = list(messages)
    last_user = next((text for role, text in reversed(pairs) if role == "user"), "")
    return {"message_count": len(pairs), "roles": [r for r, _ in pairs], "last_user_text": last_user[:200]}
