"""Replay and audit: read any topic by time range, re-price cost events, reconcile answers.

Reading by time filters on each record's own timestamp (the producer's create
time). ``offsets_for_times`` is not used: it is unreliable on the embedded
broker (EMBEDDED-BROKER.md), so a replay reads every partition from its
beginning as a broadcast reader — it never joins the live consumer groups and
commits nothing — and stops once no record has arrived for ``idle_s``
seconds (the topic's end, as far as a reader can tell without trusting end
offsets).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import msgspec

from pipeline.bus.protocol import Bus, Record
from pipeline.bus.topics import Topics
from schemas.events import CostEvent, Health
from schemas.response import AIResponse
from schemas.stream import StreamChunk
from stages.rules.archive_state import is_restored_id
from stages.rules.ledger import provider_shares
from stages.rules.pricing import PriceTable, round_usd

log = logging.getLogger("aipipe.replay")


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date-time (``2026-11-29``, ``2026-11-29T10:00:00Z``), as aware UTC.

    A time without a zone is taken as UTC.

    Raises:
        ValueError: when ``text`` is not ISO 8601.
    """
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-29 or 2026-11-29T10:00:00Z)") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def read_range(
    bus: Bus,
    topic: str,
    since: datetime,
    until: datetime | None = None,
    *,
    idle_s: float = 1.5,
    on_record: Callable[[Record], None] | None = None,
) -> list[Record]:
    """Every record of ``topic`` whose timestamp is in ``[since, until)``, in partition/offset order.

    Args:
        bus: a started bus.
        topic: full topic name.
        since: first instant included (aware).
        until: first instant excluded (aware; ``None``: no upper bound).
        idle_s: stop after this long without a new record (s).
        on_record: called for each record read (for progress display).
    """
    since_ms = int(since.timestamp() * 1000)
    until_ms = int(until.timestamp() * 1000) if until is not None else None
    consumer = await bus.consumer([topic], group=None, from_beginning=True)
    kept: list[Record] = []
    try:
        while True:
            batch: list[Record] = []
            with anyio.move_on_after(idle_s):
                while not batch:
                    batch = await consumer.getmany(200, max_records=2000)
            if not batch:
                break
            for record in batch:
                if on_record is not None:
                    on_record(record)
                if record.timestamp_ms < since_ms or (until_ms is not None and record.timestamp_ms >= until_ms):
                    continue
                kept.append(record)
    finally:
        await consumer.stop()
    kept.sort(key=lambda r: (r.partition, r.offset))
    return kept


# --- re-pricing -------------------------------------------------------------------------------


@dataclass
class RepriceLine:
    """Totals (USD) of one provider and model: as recorded, and as re-priced."""

    provider: str
    model: str
    events: int = 0
    old_usd: Decimal = Decimal(0)
    new_usd: Decimal = Decimal(0)


@dataclass
class RepriceReport:
    """Re-pricing of a set of cost events: per (provider, model) lines and totals (USD)."""

    lines: dict[tuple[str, str], RepriceLine] = field(default_factory=dict)
    undecodable: int = 0

    @property
    def old_total_usd(self) -> Decimal:
        """Sum of recorded costs (USD)."""
        return sum((line.old_usd for line in self.lines.values()), Decimal(0))

    @property
    def new_total_usd(self) -> Decimal:
        """Sum of re-priced costs (USD)."""
        return sum((line.new_usd for line in self.lines.values()), Decimal(0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: lines and totals as numbers rounded to 10 decimal places."""
        return {
            "lines": [
                {
                    "provider": ln.provider,
                    "model": ln.model,
                    "events": ln.events,
                    "old_usd": round_usd(ln.old_usd),
                    "new_usd": round_usd(ln.new_usd),
                }
                for ln in sorted(self.lines.values(), key=lambda x: (x.provider, x.model))
            ],
            "old_total_usd": round_usd(self.old_total_usd),
            "new_total_usd": round_usd(self.new_total_usd),
            "undecodable": self.undecodable,
        }


def reprice(
    events: Iterable[CostEvent],
    prices: PriceTable,
    *,
    default_cost_per_token: Mapping[str, Decimal] | None = None,
) -> RepriceReport:
    """Re-compute each cost event's cost from its recorded usage with ``prices``.

    Cache hits cost 0 under any price table (they made no provider call). An
    event with cost ``lines`` is repriced per line (each counted as an event of
    its provider and model). A
    model missing from ``prices`` is charged at its provider's entry of
    ``default_cost_per_token`` (USD per token), as the recorder does.
    """
    report = RepriceReport()
    for event in events:
        # an answer continued by a second provider is repriced line by line (DESIGN A9)
        parts = [(x.provider, x.model, x.usage, x.cost_usd) for x in event.lines] or [
            (event.provider, event.model, event.usage, event.cost_usd)
        ]
        for provider, model, usage, cost_usd in parts:
            line = report.lines.setdefault((provider, model), RepriceLine(provider, model))
            line.events += 1
            line.old_usd += Decimal(str(cost_usd))
            if not event.cached:
                default = (default_cost_per_token or {}).get(provider)
                costing = prices.cost(provider, model, usage, default_cost_per_token=default)
                line.new_usd += costing.cost_usd
    return report


def decode_all(records: Iterable[Record], type_: type[Any]) -> tuple[list[Any], int]:
    """Decode each record's value as ``type_``; returns the values and the number that failed."""
    decoder = msgspec.json.Decoder(type_)
    out: list[Any] = []
    bad = 0
    for record in records:
        try:
            out.append(decoder.decode(record.value))
        except (msgspec.DecodeError, msgspec.ValidationError):
            bad += 1
    return out, bad


# --- audit ------------------------------------------------------------------------------------


@dataclass
class AuditReport:
    """Reconciliation of requests, responses and cost events over one period.

    ``missing_responses``: request ids with no response. ``conflicting``: ids
    whose responses differ (status, content, provider or error type).
    ``duplicate_responses``: ids answered more than once identically (allowed
    by at-least-once delivery). ``missing_costs``: ``status: ok`` ids (and
    interrupted or cancelled streams that cost something) without a cost
    event; ``extra_costs``: ids with more than one cost event;
    ``orphan_costs``: cost events for ids with no ok response (or ended stream) in the period.
    ``totals_usd`` splits an answer continued by a second provider by its cost lines.
    ``reused_ids``: ids sent with two different request bodies (ids must be
    unique: the second request got the first one's answer).
    ``totals_usd``: cost per provider (USD, 10 decimal places).
    ``streams``: streamed responses checked against their chunks;
    ``stream_mismatches``: ids whose final generation's chunks, in ``seq``
    order, do not concatenate to the response's content or do not number
    ``stream_chunks`` (DESIGN A9).
    """

    requests: int = 0
    responses: int = 0
    ok: int = 0
    errors: int = 0
    cache_hits: int = 0
    cost_events: int = 0
    missing_responses: list[str] = field(default_factory=list)
    conflicting: list[str] = field(default_factory=list)
    duplicate_responses: list[str] = field(default_factory=list)
    missing_costs: list[str] = field(default_factory=list)
    extra_costs: list[str] = field(default_factory=list)
    orphan_costs: list[str] = field(default_factory=list)
    reused_ids: list[str] = field(default_factory=list)
    totals_usd: dict[str, float] = field(default_factory=dict)
    streams: int = 0
    stream_mismatches: list[str] = field(default_factory=list)
    calls: dict[str, ProviderCalls] = field(default_factory=dict)
    repeated_call_ids: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No missing, conflicting or extra item, and every stream matches its response."""
        return not (
            self.missing_responses
            or self.conflicting
            or self.missing_costs
            or self.extra_costs
            or self.reused_ids
            or self.stream_mismatches
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = {k: v for k, v in self.__dict__.items()}
        data["calls"] = {p: c.to_dict() for p, c in self.calls.items()}
        data["clean"] = self.clean
        return data


@dataclass
class ProviderCalls:
    """What one provider will invoice over the period, set against the ledger (DESIGN A11).

    ``calls``: provider calls that returned usage (each attempt's ``health``
    event); ``billed_usd``: what they cost at the price table (USD).
    ``answered``: requests whose cost event charges this provider;
    ``ledger_usd``: what those cost lines charge it. ``repeated_calls``: calls
    beyond the ones the ledger charges for the same request (a redelivery
    after a crash called the provider again, or an answer never reached the
    ledger); ``repeated_usd``: their cost. ``billed_usd - ledger_usd`` is the
    gap between the invoice and the ledger.
    """

    calls: int = 0
    billed_usd: Decimal = Decimal(0)
    answered: int = 0
    ledger_usd: Decimal = Decimal(0)
    repeated_calls: int = 0
    repeated_usd: Decimal = Decimal(0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (USD as floats, 10 decimal places)."""
        return {
            "calls": self.calls,
            "billed_usd": round_usd(self.billed_usd),
            "answered": self.answered,
            "ledger_usd": round_usd(self.ledger_usd),
            "repeated_calls": self.repeated_calls,
            "repeated_usd": round_usd(self.repeated_usd),
        }


def reconcile_calls(report: AuditReport, health: Iterable[Health], costs: Iterable[CostEvent]) -> None:
    """Fill ``report.calls``: every billed provider call (``health`` with usage) against the ledger's cost lines.

    Per request and provider, the calls beyond the number of cost lines that
    charge that provider are repeated calls; the latest ones are taken as
    the repeats.
    """
    called: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
    per: dict[str, ProviderCalls] = defaultdict(ProviderCalls)
    for call in health:
        if call.source != "attempt" or not call.ok or call.usage is None or not call.request_id:
            continue
        cost = Decimal(str(call.cost_usd)) if call.cost_usd is not None else Decimal(0)
        called[(call.request_id, call.provider)].append(cost)
        per[call.provider].calls += 1
        per[call.provider].billed_usd += cost
    charged: Counter[tuple[str, str]] = Counter()
    seen: set[str] = set()
    for event in costs:
        if event.id in seen or is_restored_id(event.id) or event.cached:
            continue
        seen.add(event.id)
        providers = [line.provider for line in event.lines] or [event.provider]
        for provider, share in provider_shares(event):
            per[provider].ledger_usd += share
        for provider in set(providers):
            per[provider].answered += 1
        for provider in providers:
            charged[(event.id, provider)] += 1
    repeated: set[str] = set()
    for (request_id, provider), costs_of_calls in called.items():
        extra = len(costs_of_calls) - charged[(request_id, provider)]
        if extra > 0:
            repeated.add(request_id)
            per[provider].repeated_calls += extra
            per[provider].repeated_usd += sum(costs_of_calls[-extra:], Decimal(0))
    report.calls = dict(sorted(per.items()))
    report.repeated_call_ids = sorted(repeated)


def _signature(response: AIResponse) -> tuple[Any, ...]:
    return (
        response.status,
        response.content,
        response.provider,
        response.model,
        response.error.type if response.error else None,
    )


def audit(
    request_records: Iterable[Record],
    responses: Iterable[AIResponse],
    costs: Iterable[CostEvent],
    chunks: Iterable[StreamChunk] = (),
) -> AuditReport:
    """Reconcile requests (by record key, else the value's id) against responses, cost events and stream chunks."""
    report = AuditReport()
    request_ids: set[str] = set()
    bodies: dict[str, bytes] = {}
    reused: set[str] = set()
    for record in request_records:
        # the value's own id (a record's key may be anything, e.g. a tenant); the key when the value has none
        try:
            rid = msgspec.json.decode(record.value, type=dict[str, Any]).get("id")
        except (msgspec.DecodeError, msgspec.ValidationError):
            rid = None
        if not isinstance(rid, str) or not rid:
            rid = record.key.decode("utf-8", "replace") if record.key else None
        if isinstance(rid, str) and rid:
            request_ids.add(rid)
            first_body = bodies.setdefault(rid, record.value)
            if first_body != record.value:
                reused.add(rid)
    report.reused_ids = sorted(reused)
    report.requests = len(request_ids)

    by_id: dict[str, list[AIResponse]] = defaultdict(list)
    for response in responses:
        by_id[response.id].append(response)
    report.responses = len(by_id)
    ok_ids: set[str] = set()
    ended_streams: set[str] = set()  # streams that ended early, invalid answers: they may cost something (A9, A4)
    billed_errors: set[str] = set()  # ... and those that did
    for rid, answers in by_id.items():
        first = answers[0]
        if len({_signature(a) for a in answers}) > 1:
            report.conflicting.append(rid)
        elif len(answers) > 1:
            report.duplicate_responses.append(rid)
        if first.status == "ok":
            report.ok += 1
            ok_ids.add(rid)
            report.cache_hits += int(first.cached)
        else:
            report.errors += 1
            if first.error is not None and first.error.type in ("stream_interrupted", "cancelled", "invalid_response"):
                ended_streams.add(rid)
                if first.cost_usd:
                    billed_errors.add(rid)
    report.missing_responses = sorted(request_ids - set(by_id))

    counts: Counter[str] = Counter()
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for event in costs:
        if is_restored_id(event.id):  # a restore's roll-up of older spend (DESIGN A11): no request of its own
            for provider, share in provider_shares(event):
                totals[provider] += share
            continue
        counts[event.id] += 1
        report.cost_events += 1
        if counts[event.id] == 1:
            for provider, share in provider_shares(event):
                totals[provider] += share
    report.missing_costs = sorted((ok_ids | billed_errors) - set(counts))
    report.extra_costs = sorted(rid for rid, n in counts.items() if n > 1)
    report.orphan_costs = sorted(set(counts) - ok_ids - ended_streams)
    report.totals_usd = {p: round_usd(v) for p, v in sorted(totals.items())}
    _check_streams(report, by_id, chunks)
    report.conflicting.sort()
    report.duplicate_responses.sort()
    return report


class _StreamTopicOnly(msgspec.Struct):
    stream_topic: str | None = None


_STREAM_TOPIC_DECODER = msgspec.json.Decoder(_StreamTopicOnly)


def stream_topics_of(request_records: Iterable[Record], topics: Topics) -> set[str]:
    """``topics.stream`` and every other stream topic the requests of ``request_records`` named."""
    found = {topics.stream}
    for record in request_records:
        try:
            topic = _STREAM_TOPIC_DECODER.decode(record.value).stream_topic
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if topic is not None and topics.is_stream_topic(topic):
            found.add(topic)
    return found


def _check_streams(report: AuditReport, by_id: dict[str, list[AIResponse]], chunks: Iterable[StreamChunk]) -> None:
    """Each streamed response's final generation: its chunks (repeats counted once) against its content."""
    pieces: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for chunk in chunks:
        pieces[(chunk.id, chunk.generation)].setdefault(chunk.seq, chunk.delta)
    for rid, answers in by_id.items():
        first = answers[0]
        if first.generation is None or first.stream_chunks is None:
            continue
        report.streams += 1
        got = pieces.get((rid, first.generation), {})
        text = "".join(got[seq] for seq in sorted(got))
        if len(got) != first.stream_chunks or sorted(got) != list(range(len(got))) or text != (first.content or ""):
            report.stream_mismatches.append(rid)
    report.stream_mismatches.sort()
