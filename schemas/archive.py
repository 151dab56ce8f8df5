"""The archive's data (DESIGN A11): one line per archived record, and the day summaries a restore reads.

An archive is ``<dir>/<topic>/<YYYY-MM-DD>.jsonl`` (a closed day:
``.jsonl.gz``), one ``ArchiveLine`` per record, in the order the archive
stage read them. Readers count a record once by (``broker_id``, topic,
``partition``, ``offset``): offsets restart with every new embedded broker,
so the broker's id is part of the key.

A closed day of ``costs`` or ``control`` also gets a summary beside it
(``<day>.summary.json``): the costs rolled up per user, provider, model and
UTC hour, or the control commands folded up to the end of that day, so a
restore reads a few small files instead of a month of records.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

from schemas.events import CircuitSnapshot, SetStrategy

#: Header of a record a restore re-published from the archive (value ``1``): the archive does not store it
#: again, and readers that merge the archive with a broker skip it there.
RESTORED_HEADER = "aipipe-restored"
#: Header of a restored request: when the pipeline first received it (Unix epoch ms), so its deadline
#: still counts from then.
RECEIVED_AT_HEADER = "aipipe-received-at-ms"


class ArchiveLine(Struct, kw_only=True, omit_defaults=True):
    """One archived record.

    ``timestamp_ms`` is the record's Kafka timestamp (Unix epoch ms).
    ``value`` is the record's JSON value as it was; a value that is not JSON
    (a dead letter's cause, a stranger's bytes) is kept in ``value_b64``
    (base64) instead. ``key`` is the key as text; a key that is not UTF-8 is
    kept in ``key_b64``. ``headers`` holds the UTF-8 headers, ``headers_b64``
    the others (base64).
    """

    broker_id: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str | None = None
    key_b64: bytes | None = None
    value: msgspec.Raw = msgspec.Raw()
    value_b64: bytes | None = None
    headers: dict[str, str] = {}
    headers_b64: dict[str, bytes] = {}

    def raw_value(self) -> bytes:
        """The record's value bytes (JSON as archived, or the base64-decoded bytes)."""
        if self.value_b64 is not None:
            return self.value_b64
        return bytes(self.value)

    def raw_key(self) -> bytes | None:
        """The record's key bytes, or ``None`` for a record without a key."""
        if self.key is not None:
            return self.key.encode("utf-8")
        return self.key_b64


class CostBucket(Struct, kw_only=True, omit_defaults=True):
    """The cost events of one UTC hour for one (user, provider, model), summed (USD, tokens).

    ``hour_ms``: the hour's start (Unix epoch ms). ``requests``: the cost
    events counted; ``cache_hits``: those that were cache hits.
    """

    user: str | None = None
    provider: str
    model: str
    hour_ms: int
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cache_hits: int = 0


class CostSummary(Struct, kw_only=True):
    """A closed day of ``costs``: its buckets, and how many records the day held."""

    day: str
    records: int
    buckets: list[CostBucket] = []


class ControlSummary(Struct, kw_only=True):
    """The commands on ``control`` folded up to the end of ``day`` (this day and every day before it).

    ``budgets``: scope -> window (``daily``/``weekly``/``monthly``) -> limit
    (USD; ``None``: no limit), the windows ever set. ``strategy``: the latest
    ``set_strategy``. ``snapshot``: the circuits as the latest snapshot and
    the transitions after it left them.
    """

    day: str
    records: int
    budgets: dict[str, dict[str, float | None]] = {}
    strategy: SetStrategy | None = None
    snapshot: CircuitSnapshot | None = None
