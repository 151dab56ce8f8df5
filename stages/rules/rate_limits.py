"""Per-provider rate limits: requests and tokens per minute (DESIGN A8 ``rate_limit.*``).

The limit is a sliding window log: every HTTP call to a provider is an entry
(time, tokens) kept for ``window_s`` (60 s). A call is admitted when, counting
it, the entries of the last ``window_s`` seconds number at most
``requests_per_minute`` and their tokens sum to at most
``tokens_per_minute``. Unlike a token bucket, which lets a full bucket plus a
minute's refill through in one minute (up to twice the limit), a sliding log
never lets more than the limit into any 60-second span.

Who does what (issue 5):

* the **executor** charges every HTTP call it makes (retries and fallbacks
  included) with ``admit``: the estimated tokens (prompt estimate plus
  ``max_tokens``; OpenAI's own rate limiter counts ``max_tokens`` the same way,
  https://platform.openai.com/docs/guides/rate-limits) are charged atomically
  with the check; after the call ``Charge.settle_answer`` corrects them to the
  real ``usage.total_tokens``, ``Charge.settle_failure`` to the prompt estimate
  (nothing was generated), and a call that never left (connection refused,
  or an error before sending) gives its whole quota back;
* the **router** only asks ``wait_s`` (room now?) to leave saturated providers
  out of the order.

``SlidingWindowLimiter`` is the pure core (injectable clock, no I/O);
``MemoryRateLimiter`` wraps it behind the async ``RateLimiter`` protocol that
``pipeline.stores.rate_limit_store.RedisRateLimiter`` also implements for replicas
sharing one Redis.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.errors import AIProviderError
from pipeline.runtime.config import RateLimit
from schemas.response import Usage

__all__ = [
    "WINDOW_S",
    "Charge",
    "MemoryRateLimiter",
    "RateLimiter",
    "SlidingWindowLimiter",
    "WindowUsage",
    "admit",
    "call_not_sent",
    "describe_limit",
    "has_limits",
    "new_call_id",
]

#: Length of the window (s): the limits are per minute.
WINDOW_S = 60.0

#: Innermost causes that prove a call never reached the provider (no connection was made).
_NOT_SENT_NAMES = frozenset(
    {
        "ConnectionRefusedError",
        "ClientConnectorError",
        "ClientConnectorDNSError",
        "ConnectError",
        "gaierror",
        "UnsupportedProtocol",
        "InvalidURL",
    }
)


def has_limits(limit: RateLimit) -> bool:
    """Whether ``limit`` sets either ``requests_per_minute`` or ``tokens_per_minute``."""
    return limit.requests_per_minute is not None or limit.tokens_per_minute is not None


def new_call_id(provider: str) -> str:
    """A unique id for one HTTP call's charge (a redelivered request's calls are new calls)."""
    return f"{provider}:{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """What a provider's window holds now: ``requests`` (calls) and ``tokens`` in the last ``window_s`` s."""

    requests: int
    tokens: int


@dataclass
class _Window:
    entries: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)  # call id -> (t s, tokens)
    tokens: int = 0
    last_t: float = -math.inf


class SlidingWindowLimiter:
    """The pure sliding-window-log limiter, one window per key (provider).

    Args:
        window_s: window length (s); the limits are "per minute" at the default 60 s.
        clock: current time in s (monotonic; injectable for tests).
    """

    def __init__(self, *, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 s, got {window_s!r}")
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def _window(self, key: str, now: float) -> _Window:
        window = self._windows.setdefault(key, _Window())
        cutoff = now - self.window_s
        entries = window.entries
        while entries:
            call_id, (t, tokens) = next(iter(entries.items()))
            if t > cutoff:
                break
            del entries[call_id]
            window.tokens -= tokens
        return window

    def _wait(self, window: _Window, limit: RateLimit, tokens: int, now: float) -> float:
        wait = 0.0
        rpm, tpm = limit.requests_per_minute, limit.tokens_per_minute
        entries = window.entries
        if rpm is not None and len(entries) + 1 > rpm:
            # The (len - rpm)-th oldest call (0-based) must leave the window first.
            t, _ = next(itertools.islice(entries.values(), len(entries) - rpm, None))
            wait = max(wait, t + self.window_s - now)
        if tpm is not None:
            if tokens > tpm:
                return math.inf
            excess = window.tokens + tokens - tpm
            if excess > 0:
                freed = 0
                for t, spent in entries.values():
                    freed += spent
                    if freed >= excess:
                        wait = max(wait, t + self.window_s - now)
                        break
        return wait

    def wait_s(self, key: str, limit: RateLimit, tokens: int) -> float:
        """Seconds until a call of ``tokens`` fits under ``limit``: 0 now, ``math.inf`` never (tokens > TPM)."""
        now = self.clock()
        return self._wait(self._window(key, now), limit, max(0, tokens), now)

    def acquire(self, key: str, limit: RateLimit, tokens: int, call_id: str) -> float:
        """Charge a call of ``tokens`` when it fits, atomically with the check.

        Returns:
            0.0 when charged; otherwise the seconds until it would fit
            (``math.inf``: never), and nothing is charged.
        """
        now = self.clock()
        window = self._window(key, now)
        tokens = max(0, tokens)
        wait = self._wait(window, limit, tokens, now)
        if wait > 0:
            return wait
        t = max(now, window.last_t)  # keep the log in time order even if the clock stalls
        window.last_t = t
        old = window.entries.pop(call_id, None)
        if old is not None:
            window.tokens -= old[1]
        window.entries[call_id] = (t, tokens)
        window.tokens += tokens
        return 0.0

    def settle(self, key: str, call_id: str, tokens: int) -> None:
        """Correct a charged call to ``tokens`` (the real usage); a call already out of the window is left alone."""
        window = self._windows.get(key)
        if window is None or call_id not in window.entries:
            return
        t, old = window.entries[call_id]
        tokens = max(0, tokens)
        window.entries[call_id] = (t, tokens)
        window.tokens += tokens - old

    def release(self, key: str, call_id: str) -> None:
        """Give a call's quota back (it was never sent)."""
        window = self._windows.get(key)
        if window is None:
            return
        entry = window.entries.pop(call_id, None)
        if entry is not None:
            window.tokens -= entry[1]

    def usage(self, key: str) -> WindowUsage:
        """Calls and tokens in ``key``'s window now."""
        now = self.clock()
        window = self._window(key, now)
        return WindowUsage(len(window.entries), window.tokens)


class RateLimiter(Protocol):
    """The async rate limiter the router and executor use (in-process or Redis)."""

    async def wait_s(self, provider: str, limit: RateLimit, tokens: int) -> float:
        """Seconds until a call of ``tokens`` fits (0: now; ``math.inf``: never)."""
        ...

    async def acquire(self, provider: str, limit: RateLimit, tokens: int, call_id: str) -> float:
        """Charge the call when it fits (returns 0.0), else return the wait (s) and charge nothing."""
        ...

    async def settle(self, provider: str, call_id: str, tokens: int) -> None:
        """Correct a charged call to ``tokens``."""
        ...

    async def release(self, provider: str, call_id: str) -> None:
        """Give a charged call's quota back."""
        ...

    async def usage(self, provider: str) -> WindowUsage:
        """Calls and tokens in the provider's window now."""
        ...

    async def aclose(self) -> None:
        """Release connections, if any."""
        ...


class MemoryRateLimiter:
    """In-process ``RateLimiter`` (one process's router and executor share it).

    Args:
        window_s: window length (s), 60 for per-minute limits.
        clock: current time (s); injectable for tests.
    """

    def __init__(self, *, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = SlidingWindowLimiter(window_s=window_s, clock=clock)

    async def wait_s(self, provider: str, limit: RateLimit, tokens: int) -> float:
        """See ``SlidingWindowLimiter.wait_s``."""
        return self.core.wait_s(provider, limit, tokens)

    async def acquire(self, provider: str, limit: RateLimit, tokens: int, call_id: str) -> float:
        """See ``SlidingWindowLimiter.acquire``."""
        return self.core.acquire(provider, limit, tokens, call_id)

    async def settle(self, provider: str, call_id: str, tokens: int) -> None:
        """See ``SlidingWindowLimiter.settle``."""
        self.core.settle(provider, call_id, tokens)

    async def release(self, provider: str, call_id: str) -> None:
        """See ``SlidingWindowLimiter.release``."""
        self.core.release(provider, call_id)

    async def usage(self, provider: str) -> WindowUsage:
        """See ``SlidingWindowLimiter.usage``."""
        return self.core.usage(provider)

    async def aclose(self) -> None:
        """Nothing to release."""


def call_not_sent(exc: BaseException) -> bool:
    """Whether a failed call provably never reached the provider (so its quota goes back).

    True when the adapter refused to build the call (``AIProviderError.sent``
    false, e.g. Anthropic with no non-empty user turn, Cloudflare without an
    account id), when the innermost cause is a refused or unresolvable
    connection or a URL no request can be made to (``ConnectionRefusedError``,
    aiohttp ``ClientConnectorError``, httpx ``ConnectError``,
    ``UnsupportedProtocol``, ``InvalidURL``, DNS ``gaierror``), or when the
    failure is not a provider error at all (the adapter failed before sending). A connect *timeout* is
    ambiguous behind the httpx-aiohttp transport, so it counts as sent.
    """
    if not isinstance(exc, AIProviderError) or not exc.sent:
        return True
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return any(type(e).__name__ in _NOT_SENT_NAMES or isinstance(e, ConnectionRefusedError) for e in seen[1:])


@dataclass
class Charge:
    """One HTTP call's charge against a provider's limits, as the executor holds it.

    ``admitted`` false means no room: nothing was charged and ``wait_s`` says
    when there will be (``math.inf``: the request's tokens exceed
    ``tokens_per_minute``, so never). ``call_id`` is ``None`` when the
    provider has no limits (nothing to settle).
    """

    provider: str
    admitted: bool
    wait_s: float = 0.0
    call_id: str | None = None
    prompt_tokens: int = 0
    limiter: RateLimiter | None = None

    async def settle_answer(self, usage: Usage) -> None:
        """Correct the charge to the answer's real ``usage.total_tokens``."""
        if self.limiter is not None and self.call_id is not None:
            await self.limiter.settle(self.provider, self.call_id, usage.total_tokens)

    async def settle_failure(self, exc: BaseException) -> None:
        """After a failed call: quota back when it was never sent, else tokens corrected to the prompt estimate."""
        if self.limiter is None or self.call_id is None:
            return
        if call_not_sent(exc):
            await self.limiter.release(self.provider, self.call_id)
        else:
            await self.limiter.settle(self.provider, self.call_id, self.prompt_tokens)


async def admit(limiter: RateLimiter, provider: str, limit: RateLimit, prompt_tokens: int, max_tokens: int) -> Charge:
    """Charge one HTTP call to ``provider``: estimated ``prompt_tokens + max_tokens`` tokens and one request.

    Returns:
        An admitted ``Charge`` (settle it after the call), or a refused one
        carrying ``wait_s``. A provider without limits is admitted without
        touching the limiter.
    """
    if not has_limits(limit):
        return Charge(provider, True, prompt_tokens=prompt_tokens)
    call_id = new_call_id(provider)
    wait = await limiter.acquire(provider, limit, prompt_tokens + max_tokens, call_id)
    if wait > 0:
        return Charge(provider, False, wait_s=wait, prompt_tokens=prompt_tokens)
    return Charge(provider, True, call_id=call_id, prompt_tokens=prompt_tokens, limiter=limiter)


def describe_limit(limit: RateLimit) -> str:
    """``"60 requests/min, 40000 tokens/min"`` (or ``"no limit"``)."""
    parts = []
    if limit.requests_per_minute is not None:
        parts.append(f"{limit.requests_per_minute} requests/min")
    if limit.tokens_per_minute is not None:
        parts.append(f"{limit.tokens_per_minute} tokens/min")
    return ", ".join(parts) or "no limit"
