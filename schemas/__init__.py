"""aipipe wire formats: one msgspec struct per topic value, no I/O (DESIGN A3, A4)."""

from schemas.envelope import Candidate, Envelope, Outcome
from schemas.events import (
    BudgetAlert,
    BudgetStatus,
    BudgetWindow,
    CacheClear,
    CacheStats,
    CacheStatsRequest,
    CircuitSnapshot,
    CircuitState,
    CircuitTransition,
    ControlEvent,
    CostEvent,
    DeadLetter,
    Health,
    ReservationRelease,
    SetBudget,
    SetStrategy,
)
from schemas.request import AIRequest, CacheOptions, Message, request_from_dict
from schemas.response import ERROR_TYPES, AIResponse, Attempt, ErrorInfo, ErrorType, Usage

SCHEMA_VERSION = 3
"""Integer version of every value schema, sent in the ``aipipe-schema`` header.

2: deployments (DESIGN A10): ``CostEvent.price_source`` may be ``deployment``;
``CostEvent.usage_source`` and ``Outcome.usage_source`` are new.
3: skips (DESIGN A8): ``Attempt.outcome`` may be ``skipped``, with the new ``Attempt.reason``.
"""

__all__ = [
    "ERROR_TYPES",
    "SCHEMA_VERSION",
    "AIRequest",
    "AIResponse",
    "Attempt",
    "BudgetAlert",
    "BudgetStatus",
    "BudgetWindow",
    "CacheClear",
    "CacheOptions",
    "CacheStats",
    "CacheStatsRequest",
    "Candidate",
    "CircuitSnapshot",
    "CircuitState",
    "CircuitTransition",
    "ControlEvent",
    "CostEvent",
    "DeadLetter",
    "Envelope",
    "ErrorInfo",
    "ErrorType",
    "Health",
    "Message",
    "Outcome",
    "ReservationRelease",
    "SetBudget",
    "SetStrategy",
    "Usage",
    "request_from_dict",
]
