"""What stages exchange, decoded and built once: one decoder per topic value, the clock, the rejection envelope."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from pipeline.runtime.runner import Emit
from schemas.envelope import Envelope, Outcome
from schemas.events import ControlEvent, CostEvent
from schemas.request import AIRequest
from schemas.response import ErrorInfo

REQUEST_DECODER = msgspec.json.Decoder(AIRequest)
ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
#: ``ai.control`` values: the tagged union of control events (DESIGN A3).
CONTROL_DECODER: msgspec.json.Decoder[Any] = msgspec.json.Decoder(ControlEvent)
COST_DECODER = msgspec.json.Decoder(CostEvent)


def new_generation() -> str:
    """A fresh generation id for one execution of a streamed request (DESIGN A9): 16 hex characters."""
    return secrets.token_hex(8)


def now_ms() -> int:
    """Unix epoch time in ms."""
    return int(time.time() * 1000)


def error_envelope(
    request_id: str, error: ErrorInfo, *, template: Envelope | None = None, attempts: list[object] | None = None
) -> Envelope:
    """An envelope that ends a request with ``error`` (keeps the request and timing of ``template``)."""
    outcome = Outcome(status="error", error=error)
    if template is not None:
        return msgspec.structs.replace(template, outcome=outcome)
    t = now_ms()
    return Envelope(id=request_id, received_at_ms=t, deadline_at_ms=t, outcome=outcome)


def to_record(record_topic: str, envelope: Envelope) -> Emit:
    """The output sending ``envelope`` to the cost-recorder, stamped with ``finished_at_ms`` (now, ms)."""
    if envelope.finished_at_ms is None:
        envelope.finished_at_ms = now_ms()
    return Emit(record_topic, envelope.id, envelope)
