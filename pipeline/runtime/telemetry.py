"""Tracing and metrics with OpenTelemetry: one trace per request across the stages, a Prometheus endpoint.

**Tracing.** Each process has one ``Telemetry`` (``current()``; ``install()``
replaces it). With an exporter configured, the runner opens a span per stage
message (``process <topic>``, kind CONSUMER, messaging semantic conventions),
continued from the message's W3C ``traceparent`` header and injected into the
``traceparent`` of everything the message produces; the executor opens a child
span per provider call (``chat <model>``, kind CLIENT, generative-AI semantic
conventions); the client opens the root span (``generate_content <model>``,
kind CLIENT) around publishing a request and awaiting its answer. Exporters
(``from_env``): console (one JSON line per span on stderr) with
``LOG_LEVEL=debug``; OTLP over HTTP/protobuf when ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; ``OTEL_TRACES_EXPORTER``
(``console``, ``otlp``, ``none``, comma-separated) overrides the choice and
``OTEL_SDK_DISABLED=true`` turns everything off. Sampling follows
``OTEL_TRACES_SAMPLER`` (the SDK's default: parent-based, always on).

With no exporter no span is created at all (no SDK tracer: nothing recorded,
nothing to drop). The runner then forwards an input's ``traceparent``
unchanged, and gives a message that has none a fresh one (``new_traceparent``:
sampled, so a downstream process that does export joins the same trace), so
every message the pipeline writes carries one (DESIGN A3).

**Metrics** (OpenTelemetry metrics API; a Prometheus scrape endpoint when a
port is given): counters and histograms recorded where the fact happens (the
executor's attempts, the recorder's final outcomes), and observable
instruments read at scrape time from what stages already count (messages
handled, dead letters, cache hits and misses, in-flight work, consumer lag,
circuit states, budget spend), so they cost nothing per message. Names and
labels are listed in ``README.md`` ("Observability").

Semantic conventions: https://opentelemetry.io/docs/specs/semconv/messaging/kafka/
(messaging spans) and https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/
(generative-AI client spans), as of semantic conventions 1.37.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeterProvider, Observation
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas.events import BudgetStatus

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from pipeline.bus.protocol import Record
    from schemas.events import ControlEvent
    from schemas.request import AIRequest
    from schemas.response import Usage

log = logging.getLogger("aipipe.telemetry")

TRACE_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
INSTRUMENTATION_NAME = "aipipe"
_PROPAGATOR = TraceContextTextMapPropagator()

#: Circuit states as gauge values (``aipipe.circuit.state``).
CIRCUIT_STATE_VALUES: dict[str, int] = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}

# --- attribute names (semantic conventions where they exist, ``aipipe.*`` otherwise) ----------
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_KAFKA_KEY = "messaging.kafka.message.key"
MESSAGING_KAFKA_OFFSET = "messaging.kafka.offset"
MESSAGING_PARTITION = "messaging.destination.partition.id"
MESSAGING_GROUP = "messaging.consumer.group.name"
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_PROVIDER = "gen_ai.provider.name"  # the name that replaces gen_ai.system in semantic conventions 1.37
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
HTTP_STATUS_CODE = "http.response.status_code"
ERROR_TYPE = "error.type"
AIPIPE_STAGE = "aipipe.stage"
AIPIPE_REQUEST_ID = "aipipe.request.id"
AIPIPE_PROVIDER = "aipipe.provider"
AIPIPE_PROVIDER_TYPE = "aipipe.provider_type"
#: ``gen_ai.provider.name`` of each deployment type (OpenTelemetry GenAI semantic conventions' well-known
#: values, https://opentelemetry.io/docs/specs/semconv/registry/attributes/gen-ai/, read 2026-12-06);
#: an ``openai_compatible`` server is named by its deployment name.
GEN_AI_SYSTEM_OF: dict[str, str] = {
    "openai": "openai",
    "azure_openai": "azure.ai.openai",
    "anthropic": "anthropic",
    "cloudflare": "cloudflare",
}
AIPIPE_STATUS_CODE = "aipipe.status_code"
AIPIPE_ERROR_TYPE = "aipipe.error_type"
AIPIPE_ATTEMPT = "aipipe.attempt.number"
AIPIPE_RETRY = "aipipe.attempt.retry"
AIPIPE_COST = "aipipe.cost_usd"
AIPIPE_LATENCY = "aipipe.latency_ms"
AIPIPE_OUTCOME = "aipipe.outcome"
AIPIPE_CACHED = "aipipe.cached"


def new_traceparent(*, sampled: bool = True) -> bytes:
    """A fresh W3C ``traceparent`` (version 00, random 128-bit trace id and 64-bit span id).

    Random like the SDK's ``RandomIdGenerator`` (``random.getrandbits``; ids
    are not secrets). ``sampled`` sets the ``01`` flag. Source: W3C Trace
    Context, https://www.w3.org/TR/trace-context/#traceparent-header.
    """
    trace_id = random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def traceparent_of(span: Span) -> bytes | None:
    """The ``traceparent`` header value naming ``span`` (``None`` for an invalid span context)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)


_TRACEPARENT_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def context_from_header(traceparent: bytes | None, tracestate: bytes | None = None) -> otel_context.Context | None:
    """The OpenTelemetry context a ``traceparent`` header names (``None``: no header or an invalid one).

    A version-00 header without ``tracestate`` (the pipeline's own) is parsed
    here (a third of the propagator's cost); anything else goes through the
    SDK's W3C propagator.
    """
    if traceparent is None:
        return None
    if tracestate is None:
        match = _TRACEPARENT_00.fullmatch(traceparent)
        if match is not None:
            trace_id, span_id = int(match[1], 16), int(match[2], 16)
            if not trace_id or not span_id:
                return None
            remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)))
            return trace.set_span_in_context(NonRecordingSpan(remote))
    carrier = {TRACE_HEADER: traceparent.decode("latin-1")}
    if tracestate is not None:
        carrier[TRACESTATE_HEADER] = tracestate.decode("latin-1")
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def _low(value: str | None) -> str:
    return value if value else "none"


class LocalCounter:
    """A cumulative counter summed in a dict per label values, read by an observable counter at scrape time.

    Args:
        labels: the label names, in the order ``add`` receives their values.
    """

    def __init__(self, *labels: str) -> None:
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, amount: float, label_values: tuple[str, ...]) -> None:
        """Add ``amount`` (>= 0) to the series of ``label_values``."""
        self.values[label_values] = self.values.get(label_values, 0) + amount

    def observe(self, _options: CallbackOptions) -> Iterator[Observation]:
        """The current totals (called by the SDK in the scraping thread)."""
        for label_values, value in list(self.values.items()):
            yield Observation(value, dict(zip(self.labels, label_values, strict=True)))


# --- sources read by the observable instruments -------------------------------------------


class BudgetGauges:
    """Latest spend and limit per (scope, window), folded from ``budget_status`` on ``ai.control``.

    Subscribed to the control feed of a process that runs the budget gate; read
    by the ``aipipe.budget.*`` gauges (USD, and spend over limit as a ratio).
    """

    def __init__(self) -> None:
        self.windows: dict[tuple[str, str], tuple[float, float | None]] = {}

    def apply(self, event: ControlEvent) -> None:
        """Fold one control event; only ``budget_status`` is used."""
        if isinstance(event, BudgetStatus):
            for window, state in event.windows.items():
                self.windows[(event.scope, window)] = (state.spent_usd, state.limit_usd)


@dataclass(eq=False)
class _Watched:
    """What one pipeline exposes to the observable instruments (held weakly)."""

    runners: list[Any] = field(default_factory=list)
    cache: Any = None
    circuits: Any = None
    budget: BudgetGauges | None = None


_WATCHED: dict[int, _Watched] = {}
_WATCH_LOCK = threading.Lock()


def watch(
    owner: object,
    *,
    runners: Iterable[Any] = (),
    cache: Any = None,
    circuits: Any = None,
    budget: BudgetGauges | None = None,
) -> Callable[[], None]:
    """Expose a pipeline's runners, cache stage, circuit view and budget gauges to the metrics.

    Args:
        owner: the pipeline (its id keys the entry; dropped when it is collected).
        runners: ``StageRunner`` objects (messages, dead letters, in flight, consumer lag).
        cache: a cache stage with ``counters.hits`` and ``counters.misses``.
        circuits: a ``CircuitView`` (``states``: provider -> state).
        budget: the ``BudgetGauges`` of a process running the budget gate.

    Returns:
        A callable that removes the entry (idempotent).
    """
    key = id(owner)
    entry = _Watched(list(runners), cache, circuits, budget)
    with _WATCH_LOCK:
        _WATCHED[key] = entry

    def unwatch() -> None:
        with _WATCH_LOCK:
            if _WATCHED.get(key) is entry:
                del _WATCHED[key]

    weakref.finalize(owner, unwatch)
    return unwatch


def _watched() -> list[_Watched]:
    with _WATCH_LOCK:
        return list(_WATCHED.values())


# --- the process's telemetry ---------------------------------------------------------------


class Telemetry:
    """Tracer and instruments of one process.

    Args:
        tracer_provider: an SDK ``TracerProvider`` with its exporters, or
            ``None`` for no tracing (no spans are created).
        meter_provider: an SDK ``MeterProvider`` with its readers, or ``None``
            for no metrics (the API's no-op instruments).
        on_shutdown: extra clean-ups run by ``shutdown`` (e.g. stopping the
            ``/metrics`` HTTP server).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        on_shutdown: Iterable[Callable[[], None]] = (),
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracing = tracer_provider is not None
        self.tracer: trace.Tracer = (
            tracer_provider.get_tracer(INSTRUMENTATION_NAME) if tracer_provider is not None else trace.NoOpTracer()
        )
        self.metering = meter_provider is not None
        meter: Meter = (meter_provider or NoOpMeterProvider()).get_meter(INSTRUMENTATION_NAME)
        self._on_shutdown = list(on_shutdown)
        self.metrics_url: str | None = None
        # Counters are summed here and read at scrape time (observable counters): an SDK counter
        # ``add`` costs about 7 us (attribute hashing), a dict update about 0.3 us.
        self.requests = LocalCounter("provider", "model", "outcome", "error_type")
        self.attempts = LocalCounter("provider", "model", "outcome", "error_type")
        self.tokens = LocalCounter("provider", "model", GEN_AI_TOKEN_TYPE)
        self.cost = LocalCounter("provider", "model")
        meter.create_observable_counter(
            "aipipe.requests",
            [self.requests.observe],
            "{request}",
            "Requests finalized by the cost-recorder, by provider, model and outcome",
        )
        meter.create_observable_counter(
            "aipipe.provider.attempts",
            [self.attempts.observe],
            "{attempt}",
            "Provider calls made by the executor, by provider, model and outcome",
        )
        self.attempt_duration = meter.create_histogram(
            "aipipe.provider.attempt.duration", "ms", "Duration of one provider call (ms)"
        )
        self.request_duration = meter.create_histogram(
            "aipipe.request.duration", "ms", "End-to-end latency of a request, cache lookup to response (ms)"
        )
        self.streams = LocalCounter("provider", "outcome")
        meter.create_observable_counter(
            "aipipe.streams",
            [self.streams.observe],
            "{stream}",
            "Streamed requests by how they ended: completed, resumed, interrupted, cancelled",
        )
        self.stream_chunks = meter.create_histogram(
            "aipipe.stream.chunks", "{chunk}", "Chunks published per streamed request"
        )
        self.first_chunk = meter.create_histogram(
            "aipipe.stream.time_to_first_chunk",
            "ms",
            "Time to first token of a streamed provider call: request sent to its first content delta (ms)",
        )
        meter.create_observable_counter(
            "aipipe.tokens", [self.tokens.observe], "{token}", "Tokens billed by providers (input, output)"
        )
        meter.create_observable_counter("aipipe.cost", [self.cost.observe], "usd", "Cost of answered requests (USD)")
        meter.create_observable_counter(
            "aipipe.stage.messages", [_observe_messages], "{message}", "Messages a stage has handled"
        )
        meter.create_observable_counter(
            "aipipe.deadletters", [_observe_deadletters], "{message}", "Values a stage sent to the dead-letter topic"
        )
        meter.create_observable_gauge(
            "aipipe.stage.in_flight", [_observe_in_flight], "{message}", "Messages a stage is handling now"
        )
        meter.create_observable_gauge(
            "aipipe.consumer.lag",
            [_observe_lag],
            "{message}",
            "Records of an input partition not yet handled: end offset minus the oldest unfinished offset",
        )
        meter.create_observable_counter(
            "aipipe.cache.lookups", [_observe_cache], "{lookup}", "Response-cache lookups, by result (hit, miss)"
        )
        meter.create_observable_gauge(
            "aipipe.circuit.state",
            [_observe_circuits],
            "1",
            "Circuit state per provider as this process sees it: 0 CLOSED, 1 HALF_OPEN, 2 OPEN",
        )
        meter.create_observable_gauge(
            "aipipe.budget.spent", [_observe_budget_spent], "usd", "Budget spend of a scope's window (USD)"
        )
        meter.create_observable_gauge(
            "aipipe.budget.limit", [_observe_budget_limit], "usd", "Budget limit of a scope's window (USD)"
        )
        meter.create_observable_gauge(
            "aipipe.budget.utilization", [_observe_budget_ratio], "1", "Budget spend over limit (0..1, above 1 = over)"
        )

    @classmethod
    def disabled(cls) -> Telemetry:
        """No tracing, no metrics: the default of every process until ``install``."""
        return cls()

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        span_exporters: Iterable[SpanExporter] = (),
    ) -> Telemetry:
        """Telemetry as the environment asks (module docstring), plus a ``/metrics`` endpoint on ``metrics_port``.

        Args:
            env: environment (default ``os.environ``): ``LOG_LEVEL``,
                ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
                ``OTEL_TRACES_EXPORTER``, ``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``.
            metrics_port: TCP port of the Prometheus endpoint (``None``: no
                endpoint and no metrics; ``0``: any free port, see ``metrics_url``).
            metrics_host: interface the endpoint listens on.
            span_exporters: extra exporters (tests: an in-memory one), each
                behind a synchronous processor.

        Raises:
            OSError: when the metrics port cannot be bound.
        """
        e = os.environ if env is None else env
        if (e.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
            return cls.disabled()
        exporters = _span_exporters(e)
        tracer_provider = (
            build_tracer_provider(e, exporters, list(span_exporters)) if (exporters or span_exporters) else None
        )
        if metrics_port is None:
            return cls(tracer_provider=tracer_provider)
        meter_provider, url, stop = start_prometheus(e, metrics_port, metrics_host)
        telemetry = cls(tracer_provider=tracer_provider, meter_provider=meter_provider, on_shutdown=[stop])
        telemetry.metrics_url = url
        return telemetry

    def shutdown(self) -> None:
        """Flush and close exporters, stop the metrics endpoint (idempotent)."""
        callbacks, self._on_shutdown = self._on_shutdown, []
        for callback in callbacks:
            callback()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
            self.tracer_provider = None
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
            self.meter_provider = None

    # --- stage messages (runner) -------------------------------------------------------------

    def start_stage_span(
        self, record: Record, stage: str, group: str, system: str
    ) -> tuple[Span, object, bytes | None]:
        """Open and make current the span of one stage message; ``(span, token, traceparent for outputs)``.

        The span continues the record's ``traceparent`` (a root span when it
        has none). End it with ``end_stage_span`` in the same task.
        """
        parent = context_from_header(record.header(TRACE_HEADER), record.header(TRACESTATE_HEADER))
        attributes: dict[str, Any] = {
            MESSAGING_SYSTEM: system,
            MESSAGING_DESTINATION: record.topic,
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_OPERATION_NAME: "process",
            MESSAGING_PARTITION: str(record.partition),
            MESSAGING_KAFKA_OFFSET: record.offset,
            MESSAGING_GROUP: group,
            AIPIPE_STAGE: stage,
        }
        if record.key is not None:
            key = record.key.decode("utf-8", "replace")
            attributes[MESSAGING_KAFKA_KEY] = key
        span = self.tracer.start_span(
            f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token, traceparent_of(span)

    @staticmethod
    def end_stage_span(span: Span, token: object) -> None:
        """Detach and end a span opened by ``start_stage_span``."""
        otel_context.detach(token)  # type: ignore[arg-type]
        span.end()

    @staticmethod
    def mark_error(error_type: str) -> None:
        """Mark the current span (if recording) failed with ``error_type`` (no message: it may hold data)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(ERROR_TYPE, error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))

    @staticmethod
    def annotate(attributes: Mapping[str, Any]) -> None:
        """Add ``attributes`` to the current span when it is recording (``None`` values skipped)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    # --- provider attempts (executor) ---------------------------------------------------------

    def start_attempt(
        self, provider: str, model: str, request: AIRequest, attempt_number: int, provider_type: str | None = None
    ) -> Span | None:
        """A child span of the current one for one provider call (``None`` when not tracing).

        ``provider`` is the deployment name (``aipipe.provider``); ``provider_type`` its wire format
        (``aipipe.provider_type``), which also gives ``gen_ai.provider.name`` (``GEN_AI_SYSTEM_OF``).
        """
        if not self.tracing:
            return None
        system = GEN_AI_SYSTEM_OF.get(provider_type or provider, provider)
        attributes: dict[str, Any] = {
            GEN_AI_OPERATION: "chat",
            GEN_AI_SYSTEM: system,
            GEN_AI_PROVIDER: system,
            GEN_AI_REQUEST_MODEL: model,
            GEN_AI_MAX_TOKENS: request.max_tokens,
            AIPIPE_PROVIDER: provider,
            AIPIPE_PROVIDER_TYPE: provider_type or provider,
            AIPIPE_REQUEST_ID: request.id,
            AIPIPE_ATTEMPT: attempt_number,
            AIPIPE_RETRY: attempt_number - 1,
        }
        if request.temperature is not None:
            attributes[GEN_AI_TEMPERATURE] = request.temperature
        return self.tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes)

    def finish_attempt(
        self,
        span: Span | None,
        provider: str,
        model: str,
        *,
        ok: bool,
        status_code: int | None,
        error_type: str | None,
        latency_ms: float,
        usage: Usage | None = None,
        response_model: str | None = None,
        cost_usd: Callable[[], Decimal | None] | None = None,
    ) -> None:
        """Record one provider call: the attempt counter and latency histogram (ms), and end its span.

        ``cost_usd`` is called only when the span records (pricing is not
        free); it returns USD or ``None`` when the model has no price.
        """
        if self.metering:
            outcome = "ok" if ok else "error"
            self.attempts.add(1, (provider, model, outcome, _low(error_type)))
            self.attempt_duration.record(latency_ms, {"provider": provider, "model": model, "outcome": outcome})
        if span is None:
            return
        if span.is_recording():
            attributes: dict[str, Any] = {AIPIPE_LATENCY: round(latency_ms, 3)}
            if status_code is not None:
                attributes[HTTP_STATUS_CODE] = status_code
                attributes[AIPIPE_STATUS_CODE] = status_code
            if response_model:
                attributes[GEN_AI_RESPONSE_MODEL] = response_model
            if usage is not None:
                attributes[GEN_AI_INPUT_TOKENS] = usage.prompt_tokens
                attributes[GEN_AI_OUTPUT_TOKENS] = usage.completion_tokens
            if ok and cost_usd is not None:
                cost = cost_usd()
                if cost is not None:
                    attributes[AIPIPE_COST] = float(round(cost, 10))
            if error_type is not None:
                attributes[ERROR_TYPE] = error_type
                attributes[AIPIPE_ERROR_TYPE] = error_type
                span.set_status(Status(StatusCode.ERROR, error_type))
            span.set_attributes(attributes)
        span.end()

    def record_first_chunk(self, provider: str, model: str, ms: float) -> None:
        """Record a streamed call's time to first token (ms), from sending it to its first content delta."""
        if self.metering:
            self.first_chunk.record(ms, {"provider": provider, "model": model})

    def record_stream(self, provider: str | None, outcome: str, chunks: int) -> None:
        """Count one ended streamed request by outcome, and record its number of published chunks.

        ``outcome``: ``completed``, ``resumed``, ``interrupted`` or ``cancelled``.
        """
        if self.metering:
            self.streams.add(1, (_low(provider), outcome))
            self.stream_chunks.record(chunks, {"outcome": outcome})

    # --- final outcomes (recorder) -------------------------------------------------------------

    def record_outcome(
        self,
        *,
        provider: str | None,
        model: str | None,
        status: str,
        cached: bool,
        error_type: str | None,
        latency_ms: float,
        usage: Usage,
        cost_usd: Decimal,
    ) -> None:
        """Count one finalized request: outcome, end-to-end latency (ms), tokens and cost (USD).

        ``outcome`` label: ``ok``, ``cache_hit`` or ``error``. Tokens and cost
        count calls a provider answered (a cache hit bills nothing). Also sets
        the outcome on the current span when it records.
        """
        outcome = "error" if status != "ok" else ("cache_hit" if cached else "ok")
        if self.metering:
            self.requests.add(1, (_low(provider), _low(model), outcome, _low(error_type)))
            self.request_duration.record(latency_ms, {"provider": _low(provider), "outcome": outcome})
            if outcome == "ok" and provider and model:
                self.tokens.add(usage.prompt_tokens, (provider, model, "input"))
                self.tokens.add(usage.completion_tokens, (provider, model, "output"))
                if cost_usd:
                    self.cost.add(float(cost_usd), (provider, model))
        if self.tracing:
            self.annotate(
                {
                    AIPIPE_OUTCOME: outcome,
                    AIPIPE_PROVIDER: provider,
                    GEN_AI_RESPONSE_MODEL: model,
                    AIPIPE_COST: float(round(cost_usd, 10)),
                    AIPIPE_LATENCY: round(latency_ms, 3),
                    AIPIPE_CACHED: cached,
                    ERROR_TYPE: error_type,
                }
            )

    # --- the client's root span ----------------------------------------------------------------

    def start_request(self, request: AIRequest, topic: str) -> tuple[Span | None, bytes | None]:
        """The client's span for one request and the ``traceparent`` to publish it with.

        Tracing: a new span (child of the caller's current span, if any).
        Otherwise: the caller's current span context when the application
        traces with OpenTelemetry itself, else no header (the first stage starts the trace).
        """
        if not self.tracing:
            return None, traceparent_of(trace.get_current_span())
        span = self.tracer.start_span(
            f"generate_content {request.model}",
            kind=SpanKind.CLIENT,
            attributes={
                GEN_AI_OPERATION: "generate_content",
                GEN_AI_REQUEST_MODEL: request.model,
                GEN_AI_MAX_TOKENS: request.max_tokens,
                AIPIPE_REQUEST_ID: request.id,
                MESSAGING_DESTINATION: topic,
            },
        )
        return span, traceparent_of(span)

    @staticmethod
    def finish_request(span: Span | None, response: Any, error_type: str | None = None) -> None:
        """End the client's span with the response's outcome (``response`` an ``AIResponse`` or ``None``)."""
        if span is None:
            return
        if span.is_recording():
            if response is not None:
                attributes: dict[str, Any] = {
                    AIPIPE_OUTCOME: response.status,
                    AIPIPE_CACHED: response.cached,
                    AIPIPE_COST: response.cost_usd,
                    AIPIPE_LATENCY: response.latency_ms,
                    GEN_AI_INPUT_TOKENS: response.usage.prompt_tokens,
                    GEN_AI_OUTPUT_TOKENS: response.usage.completion_tokens,
                }
                if response.provider:
                    attributes[AIPIPE_PROVIDER] = response.provider
                if response.model:
                    attributes[GEN_AI_RESPONSE_MODEL] = response.model
                span.set_attributes(attributes)
                if response.error is not None:
                    error_type = response.error.type
            if error_type is not None:
                span.set_attribute(ERROR_TYPE, error_type)
                span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()


# --- building providers ----------------------------------------------------------------------


def _span_exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters the environment asks for (module docstring)."""
    chosen_raw = (env.get("OTEL_TRACES_EXPORTER") or "").strip().lower()
    if chosen_raw:
        chosen = {c.strip() for c in chosen_raw.split(",") if c.strip()}
    else:
        chosen = set()
        if (env.get("LOG_LEVEL") or "").strip().lower() == "debug":
            chosen.add("console")
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            chosen.add("otlp")
    chosen.discard("none")
    exporters: list[SpanExporter] = []
    if "console" in chosen:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporters.append(ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"))
    if "otlp" in chosen:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint and base:
            endpoint = base.rstrip("/") + "/v1/traces"  # the OTLP/HTTP signal path (OTLP exporter spec)
        exporters.append(OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter())
    unknown = chosen - {"console", "otlp"}
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER: ignoring unsupported exporter(s) %s", ", ".join(sorted(unknown)))
    return exporters


def _resource(env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.resources import Resource

    name = env.get("OTEL_SERVICE_NAME") or "aipipe"
    return Resource.create({"service.name": name})


def build_tracer_provider(
    env: Mapping[str, str], exporters: Iterable[SpanExporter], sync_exporters: Iterable[SpanExporter] = ()
) -> TracerProvider:
    """An SDK ``TracerProvider``: OTLP behind a batch processor, console and ``sync_exporters`` behind simple ones.

    The sampler comes from ``OTEL_TRACES_SAMPLER`` (SDK default: parent-based, always on).
    """
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=_resource(env))
    for exporter in exporters:
        if isinstance(exporter, ConsoleSpanExporter):
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    for exporter in sync_exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def start_prometheus(env: Mapping[str, str], port: int, host: str) -> tuple[MeterProvider, str, Callable[[], None]]:
    """A ``MeterProvider`` read by the OpenTelemetry Prometheus exporter, served on ``host:port`` (``/metrics``).

    Returns ``(meter_provider, url of /metrics, stop)``. The exporter has its
    own registry, so several providers in one process (tests) do not collide.

    Raises:
        OSError: when the port cannot be bound.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader], resource=_resource(env))
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{shown}:{bound}/metrics"
    log.info("metrics endpoint at %s", url)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return provider, url, stop


# --- observable callbacks (run at scrape time, in the scraping thread) -----------------------


def _observe_messages(_options: CallbackOptions) -> Iterator[Observation]:
    totals: dict[str, int] = {}
    for w in _watched():
        for runner in w.runners:
            totals[runner.stage.name] = totals.get(runner.stage.name, 0) + runner.processed
    for stage, value in totals.items():
        yield Observation(value, {"stage": stage})


def _observe_deadletters(_options: CallbackOptions) -> Iterator[Observation]:
    totals: dict[tuple[str, str], int] = {}
    for w in _watched():
        for runner in w.runners:
            key = (runner.stage.name, runner.stage.input_topic)
            totals[key] = totals.get(key, 0) + runner.dead_lettered
    for (stage, topic), value in totals.items():
        yield Observation(value, {"stage": stage, "topic": topic})


def _observe_in_flight(_options: CallbackOptions) -> Iterator[Observation]:
    totals: dict[str, int] = {}
    for w in _watched():
        for runner in w.runners:
            totals[runner.stage.name] = totals.get(runner.stage.name, 0) + runner.in_flight
    for stage, value in totals.items():
        yield Observation(value, {"stage": stage})


def _observe_lag(_options: CallbackOptions) -> Iterator[Observation]:
    for w in _watched():
        for runner in w.runners:
            try:
                lag = runner.lag()
            except RuntimeError:  # the loop changed a tracker while this thread read it; next scrape
                continue
            for (topic, partition), value in sorted(lag.items()):
                yield Observation(value, {"stage": runner.stage.name, "topic": topic, "partition": str(partition)})


def _observe_cache(_options: CallbackOptions) -> Iterator[Observation]:
    hits = misses = 0
    seen = False
    for w in _watched():
        if w.cache is not None:
            seen = True
            hits += w.cache.counters.hits
            misses += w.cache.counters.misses
    if seen:
        yield Observation(hits, {"result": "hit"})
        yield Observation(misses, {"result": "miss"})


def _observe_circuits(_options: CallbackOptions) -> Iterator[Observation]:
    states: dict[str, int] = {}
    for w in _watched():
        if w.circuits is not None:
            for provider, state in list(w.circuits.states.items()):
                states[provider] = max(states.get(provider, 0), CIRCUIT_STATE_VALUES.get(state, 0))
    for provider, value in sorted(states.items()):
        yield Observation(value, {"provider": provider})


def _budget_windows() -> dict[tuple[str, str], tuple[float, float | None]]:
    merged: dict[tuple[str, str], tuple[float, float | None]] = {}
    for w in _watched():
        if w.budget is not None:
            merged.update(dict(w.budget.windows))
    return merged


def _observe_budget_spent(_options: CallbackOptions) -> Iterator[Observation]:
    for (scope, window), (spent, _limit) in sorted(_budget_windows().items()):
        yield Observation(spent, {"scope": scope, "window": window})


def _observe_budget_limit(_options: CallbackOptions) -> Iterator[Observation]:
    for (scope, window), (_spent, limit) in sorted(_budget_windows().items()):
        if limit is not None:
            yield Observation(limit, {"scope": scope, "window": window})


def _observe_budget_ratio(_options: CallbackOptions) -> Iterator[Observation]:
    for (scope, window), (spent, limit) in sorted(_budget_windows().items()):
        if limit is not None:
            yield Observation(
                spent / limit if limit > 0 else (1.0 if spent > 0 else 0.0), {"scope": scope, "window": window}
            )


# --- the process-wide instance ----------------------------------------------------------------

_current = Telemetry.disabled()
_configured = False


def current() -> Telemetry:
    """The process's telemetry (disabled until ``install`` or ``ensure_configured``)."""
    return _current


def install(telemetry: Telemetry) -> Telemetry:
    """Make ``telemetry`` the process's; returns the previous one (not shut down)."""
    global _current, _configured
    previous, _current = _current, telemetry
    _configured = True
    return previous


def ensure_configured(env: Mapping[str, str] | None = None) -> Telemetry:
    """Install ``Telemetry.from_env(env)`` (tracing only) unless this process already installed one.

    Used by the library entry points (the manager), so ``OTEL_*`` variables and
    ``LOG_LEVEL=debug`` work there as in ``aipipe run``.
    """
    if not _configured:
        install(Telemetry.from_env(env))
    return _current


__all__ = [
    "CIRCUIT_STATE_VALUES",
    "TRACE_HEADER",
    "BudgetGauges",
    "Telemetry",
    "build_tracer_provider",
    "context_from_header",
    "current",
    "ensure_configured",
    "install",
    "new_traceparent",
    "start_prometheus",
    "traceparent_of",
    "watch",
]
