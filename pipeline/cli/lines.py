"""One readable line for every value on every topic (``aipipe tail``); ``--json`` prints the raw values instead.

Each line starts with the record's time (UTC, from the record's timestamp), then
the value's essentials: a request's id, model, user and the start of its
prompt; an envelope's stage, candidates and outcome; a response's id, status,
provider/model, cost, latency and the start of its answer (or its error); a
cost event's provider/model, cost and tokens; every control event
(``describe_control_event``); a dead letter's
origin, reason and size. A value that does not decode is shown as text.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from msgspec import UNSET

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.runtime.messages import CONTROL_DECODER, COST_DECODER, ENVELOPE_DECODER, REQUEST_DECODER
from schemas import AIRequest, AIResponse, CostEvent, DeadLetter, Envelope
from schemas.events import (
    BudgetAlert,
    BudgetStatus,
    CacheClear,
    CacheStats,
    CacheStatsRequest,
    CancelRequest,
    CircuitSnapshot,
    CircuitTransition,
    ControlEvent,
    Health,
    ReservationRelease,
    SetBudget,
    SetStrategy,
)
from schemas.stream import StreamChunk
from stages.rules.archive_state import is_restored_id

#: Characters of a prompt or an answer a line shows.
TEXT_CHARS = 60

_RESPONSE_DECODER = msgspec.json.Decoder(AIResponse)
_DEADLETTER_DECODER = msgspec.json.Decoder(DeadLetter)
_CHUNK_DECODER = msgspec.json.Decoder(StreamChunk)


def _clip(text: str | None) -> str:
    flat = " ".join((text or "").split())
    return f'"{flat[:TEXT_CHARS]}{"..." if len(flat) > TEXT_CHARS else ""}"'


def _at(record: Record) -> str:
    moment = datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _request(value: AIRequest) -> str:
    text = (
        value.prompt
        if value.prompt is not None
        else next((m.text() for m in reversed(value.chat_messages()) if m.role == "user"), "")
    )
    user = f" user={value.user}" if value.user else ""
    return f"request  {value.id} {value.model}{user} max_tokens={value.max_tokens} {_clip(text)}"


def _envelope(value: Envelope) -> str:
    chain = ",".join(c.provider for c in value.candidates) or "-"
    if value.outcome is None:
        return f"envelope {value.id} candidates={chain}"
    outcome = value.outcome
    result = outcome.status if outcome.error is None else f"{outcome.status} {outcome.error.type}"
    return f"envelope {value.id} candidates={chain} outcome={result} provider={outcome.provider or '-'}"


def _response(value: AIResponse) -> str:
    where = f"{value.provider or '-'}/{value.model or '-'}"
    money = f"${value.cost_usd:.8f}{' cached' if value.cached else ''}"
    head = f"response {value.id} {value.status} {where} {money} {value.latency_ms:.0f}ms"
    if value.stream_chunks is not None:
        head += f" streamed={value.stream_chunks}"
    if value.error is not None:
        return f"{head} {value.error.type}: {_clip(value.error.message)}"
    if value.tool_calls:
        calls = ", ".join(f"{c.function.name}({c.function.arguments[:80]}) id={c.id}" for c in value.tool_calls)
        return f"{head} finish=tool_calls {calls}" + (f" {_clip(value.content)}" if value.content else "")
    return f"{head} {_clip(value.content)}"


def _cost(value: CostEvent) -> str:
    user = f" user={value.user}" if value.user else ""
    flags = "".join(
        f" {flag}"
        for flag, on in (
            ("cached", value.cached),
            (f"price={value.price_source}", value.price_source != "table"),
            ("usage=estimated", value.usage_source == "estimated"),
            (value.status, value.status != "ok"),
            (f"lines={len(value.lines)}", len(value.lines) > 1),
            (f"restored roll-up of {value.requests} request(s)", is_restored_id(value.id)),
        )
        if on
    )
    return (
        f"cost     {value.id} {value.provider}/{value.model} ${value.cost_usd:.10f} "
        f"tokens={value.usage.total_tokens}{user}{flags}"
    )


def _chunk(value: StreamChunk) -> str:
    where = f"{value.provider or '-'}/{value.model or '-'}"
    origin = "cached" if value.cached or value.attempt is None else f"attempt={value.attempt}"
    head = f"chunk    {value.id} gen={value.generation} #{value.seq} {where} {origin}"
    tools = "".join(
        f" tool[{d.index}]"
        + (f" {d.function.name} id={d.id}" if d.id or d.function.name else "")
        + f" +{d.function.arguments!r}"
        for d in value.tool_call_deltas
    )
    return f"{head} {value.delta!r}{tools}"


def _dead(value: DeadLetter) -> str:
    size = value.raw_size if value.raw_size is not None else len(value.raw)
    cut = " truncated" if value.truncated else ""
    return (
        f"dead     {value.source_topic}@{value.partition}/{value.offset} key={value.key or '-'} "
        f"stage={value.stage} {size} bytes{cut}: {_clip(value.reason)}"
    )


def _format(decode: Callable[[bytes], Any], render: Callable[[Any], str]) -> Callable[[Record], str]:
    def line(record: Record) -> str:
        try:
            return f"{_at(record)}  {render(decode(record.value))}"
        except (msgspec.DecodeError, msgspec.ValidationError):
            key = record.key.decode("utf-8", "replace") if record.key else "-"
            text = _clip(record.value.decode("utf-8", "replace"))
            return f"{_at(record)}  unreadable {record.partition}:{record.offset} key={key} {text}"

    return line


def _control(record: Record) -> str:
    try:
        return describe_control_event(CONTROL_DECODER.decode(record.value), record)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return f"{_at(record)}  unreadable {_clip(record.value.decode('utf-8', 'replace'))}"


def printable(text: str) -> str:
    r"""``text`` with every control or format character written as an escape (``\n``, ``\x1b``).

    A value's fields may hold newlines or terminal escape sequences (a request's
    ``user``, ``model`` or ``id``): printed raw they would split a line or move
    the operator's cursor and clear the screen.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def printable_text(text: str) -> str:
    r"""An answer's text for a terminal: newlines and tabs kept, every other control character escaped (``\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii") for c in text)


def formatter(topics: Topics, topic: str) -> Callable[[Record], str]:
    """The line maker for records of ``topic`` (any topic of ``topics``): one printable line per record."""
    line = _formatter(topics, topic)
    return lambda record: printable(line(record))


def _formatter(topics: Topics, topic: str) -> Callable[[Record], str]:
    if topic == topics.requests:
        return _format(REQUEST_DECODER.decode, _request)
    if topic == topics.responses:
        return _format(_RESPONSE_DECODER.decode, _response)
    if topic == topics.costs:
        return _format(COST_DECODER.decode, _cost)
    if topic == topics.deadletter:
        return _format(_DEADLETTER_DECODER.decode, _dead)
    if topic == topics.control:
        return _control
    if topics.is_stream_topic(topic):
        return _format(_CHUNK_DECODER.decode, _chunk)
    return _format(ENVELOPE_DECODER.decode, _envelope)


def _limit(value: object) -> str:
    if value is UNSET:
        return "unchanged"
    return "unlimited" if value is None else f"${value:.2f}"


def _control_body(event: ControlEvent) -> str:
    match event:
        case Health():
            if event.ok:
                outcome = "ok"
            else:
                code = f" {event.status_code}" if event.status_code is not None else ""
                outcome = f"{event.error_type}{code}"
            wait = f" retry-after {event.retry_after_s:g}s" if event.retry_after_s is not None else ""
            origin = f" {event.request_id}" if event.request_id else ""
            took = f"{event.latency_ms:.0f}ms"
            return f"health   {event.provider}/{event.model} {outcome}{wait} {took} ({event.source}{origin})"
        case CircuitTransition():
            cool = f", cool-off {event.cool_off_s:g}s" if event.cool_off_s is not None else ""
            return f"circuit  {event.provider}: {event.from_state} -> {event.to_state} ({event.reason}{cool})"
        case CircuitSnapshot():
            states = ", ".join(f"{p}={s}" for p, s in sorted(event.states.items())) or "(none)"
            return f"circuits {states}"
        case BudgetAlert():
            return (
                f"budget   {event.scope} {event.window} reached {event.threshold_pct}%: "
                f"${event.spent_usd:.4f} of ${event.limit_usd:.2f}"
            )
        case BudgetStatus():
            windows = ", ".join(
                f"{name} ${w.spent_usd:.4f}+{w.reserved_usd:.4f} reserved of {_limit(w.limit_usd)}"
                for name, w in event.windows.items()
            )
            return f"budget   {event.scope}: {windows or '(no windows)'}"
        case ReservationRelease():
            return f"release  {event.request_id} {event.scope} ${event.amount_usd:.6f}"
        case SetBudget():
            limits = ", ".join(f"{w} {_limit(getattr(event, f'{w}_usd'))}" for w in ("daily", "weekly", "monthly"))
            return f"command  set_budget {event.scope}: {limits}"
        case SetStrategy():
            weights = " " + ",".join(f"{p}={w:g}" for p, w in sorted(event.weights.items())) if event.weights else ""
            return f"command  set_strategy {event.name}{weights}"
        case CacheClear():
            origin = f" ({event.request_id})" if event.request_id else ""
            return f"command  cache_clear{origin}"
        case CancelRequest():
            return f"command  cancel_request {event.request_id}"
        case CacheStatsRequest():
            origin = f" ({event.request_id})" if event.request_id else ""
            return f"command  cache_stats_request{origin}"
        case CacheStats():
            where = f" {event.store or '-'}/{event.replica or '-'}"
            reply = f" (reply to {event.in_reply_to})" if event.in_reply_to else ""
            return (
                f"cache   {where} hits={event.hits} misses={event.misses} entries={event.entries} "
                f"evictions={event.evictions} bytes={event.bytes}{reply}"
            )
    return msgspec.json.encode(event).decode()  # a type added later: its JSON, never an error


def describe_control_event(event: ControlEvent, record: Record | None = None) -> str:
    """One line of text for any control event (``aipipe tail control``).

    The line starts with the event's ``at`` (RFC 3339 UTC), or the record's
    timestamp for commands published without one.
    """
    if event.at is not None:
        at = event.at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    else:
        at = _at(record) if record is not None else "-"
    return f"{at}  {_control_body(event)}"
