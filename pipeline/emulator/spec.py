"""The emulator's fault specification: msgspec structs shared by Python, JSON and TOML.

The same document is accepted by ``EmulatorServer(profile=...)``,
``emulator.faults.load(...)``, ``POST /_emulator/faults`` (JSON) and
``aipipe emulator --profile FILE.toml``. Example (JSON)::

    {
      "seed": 7,
      "providers": {
        "openai": {
          "schedule": [
            {"status": 429, "retry_after_s": 2, "retry_after_http_date": true},
            {"action": "reset"},
            {"kind": "context_length"}
          ],
          "probabilities": {"500": 0.1, "hang": 0.02},
          "latency": {"dist": "uniform", "min_ms": 5, "max_ms": 25}
        },
        "anthropic": {
          "models": {"claude-3-5-haiku-20241022": {"default": {"status": 529}}}
        },
        "cloudflare": {"default": {"action": "malformed_json"}}
      },
      "extra_models": {"openai": ["my-finetune"]}
    }

The same in TOML::

    seed = 7
    [providers.openai]
    probabilities = { "500" = 0.1 }
    latency = { dist = "fixed", ms = 20 }
    [[providers.openai.schedule]]
    status = 429
    retry_after_s = 2

How one call picks its response (provider ``P``, model ``M``):

1. the next step of ``M``'s ``schedule``, else of ``P``'s ``schedule`` (each
   step is used once, in order);
2. else one draw of the seeded RNG against ``probabilities`` (``M``'s rule when
   it has any, else ``P``'s; keys are status codes or action names; the rest of
   the probability mass is a normal answer);
3. else ``default`` (``M``'s, else ``P``'s);
4. else a normal answer.

Latency: the step's ``latency_ms`` when set, else ``M``'s ``latency``, else
``P``'s. ``P`` is a built-in provider or a deployment served under
``/d/<name>`` (DESIGN A10); a deployment's rules also set its dialect
(``omit_usage``, ``error_body``). Invalid documents fail with ``msgspec.ValidationError`` naming the
path, e.g. ``Expected `int` >= 100 - at `$.providers.openai.schedule[0].status```.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

#: The wire formats the emulator speaks, and the built-in targets at its root paths.
Wire = Literal["openai", "anthropic", "cloudflare"]
PROVIDERS: tuple[Wire, ...] = ("openai", "anthropic", "cloudflare")
#: A target: a built-in provider name, or a deployment name served under ``/d/<name>`` (DESIGN A10).
Provider = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]

#: What a scheduled call does.
#: ``ok`` normal answer; ``error`` an HTTP error (``status``/``kind``); ``hang``
#: no answer for ``hang_s`` (past any client timeout); ``reset`` the TCP
#: connection is reset with no HTTP answer; ``malformed_json`` 200 with a
#: truncated JSON body; ``empty_content`` 200 with a well-formed body whose
#: text is empty; ``invalid_json_schema`` 200 with a well-formed answer whose
#: JSON does not validate: a structured-output answer (``response_format``
#: ``json_schema``) violating its schema (``json_object``: a text that is no
#: JSON), or tool call arguments violating the tool's schema (where some
#: object can; a plain text answer is unchanged).
Action = Literal["ok", "error", "hang", "reset", "malformed_json", "empty_content", "invalid_json_schema"]
ACTIONS: tuple[str, ...] = (
    "ok",
    "error",
    "hang",
    "reset",
    "malformed_json",
    "empty_content",
    "invalid_json_schema",
)

#: Error bodies the emulator can send, each shaped like the provider's own.
ErrorKind = Literal[
    "invalid_request",
    "authentication",
    "permission",
    "not_found",
    "timeout",
    "rate_limit",
    "server",
    "unavailable",
    "overloaded",
    "context_length",
    "content_filter",
]

Status = Annotated[int, Meta(ge=100, le=599)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Probability = Annotated[float, Meta(ge=0, le=1)]

#: Default ``hang`` duration (s): longer than any sensible client timeout.
DEFAULT_HANG_S = 600.0


class FaultStep(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One emulated response.

    ``action`` defaults to ``error`` when ``status`` (other than 2xx) or
    ``kind`` is given, else ``ok``. For ``error``: ``status`` (HTTP code) and
    ``kind`` (body shape) default from each other (``kind`` from the status:
    400 invalid_request, 401 authentication, 403 permission, 404 not_found,
    408 timeout, 429 rate_limit, 503 unavailable, 529 overloaded, other 5xx
    server; ``status`` from the kind, e.g. ``overloaded`` is 529 at Anthropic and
    503 elsewhere, ``context_length``/``content_filter`` are 400; neither given:
    500 server). ``message`` replaces the provider's error text.

    ``retry_after_s`` sends ``Retry-After`` (s); with ``retry_after_http_date``
    it is sent as an HTTP-date that many seconds ahead. ``retry_after_ms`` sends
    ``retry-after-ms`` (ms). ``latency_ms`` overrides the rule's latency (ms).
    ``hang_s`` is how long ``hang`` waits (s). ``cached_tokens`` makes an ``ok``
    answer report that many prompt tokens as cache reads (tokens).

    Stream faults, for a request with ``stream: true`` (DESIGN A9):
    ``first_chunk_delay_ms`` holds the first content delta back (ms; the
    protocol's opening events are sent at once), ``chunk_interval_ms`` is the
    gap between content deltas (ms), and after ``stream_cut_after`` content
    deltas the connection is cut, after ``stream_stall_after`` the stream
    stalls (for ``hang_s``), after ``stream_malformed_after`` a malformed event
    is sent and the stream ends.
    """

    action: Action | None = None
    status: Status | None = None
    kind: ErrorKind | None = None
    message: str | None = None
    retry_after_s: NonNegFloat | None = None
    retry_after_http_date: bool = False
    retry_after_ms: Annotated[int, Meta(ge=0)] | None = None
    latency_ms: NonNegFloat | None = None
    hang_s: NonNegFloat = DEFAULT_HANG_S
    cached_tokens: Annotated[int, Meta(ge=0)] = 0
    first_chunk_delay_ms: NonNegFloat = 0.0
    chunk_interval_ms: NonNegFloat = 0.0
    stream_cut_after: Annotated[int, Meta(ge=0)] | None = None
    stream_stall_after: Annotated[int, Meta(ge=0)] | None = None
    stream_malformed_after: Annotated[int, Meta(ge=0)] | None = None

    def resolved_action(self) -> Action:
        """The action to perform, applying the defaults described above."""
        if self.action is not None:
            return self.action
        if self.kind is not None or (self.status is not None and not 200 <= self.status < 300):
            return "error"
        return "ok"


class FixedLatency(Struct, tag="fixed", tag_field="dist", kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Every call waits ``ms`` milliseconds."""

    ms: NonNegFloat


class UniformLatency(Struct, tag="uniform", tag_field="dist", kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Each call waits a uniform draw in [``min_ms``, ``max_ms``] milliseconds."""

    min_ms: NonNegFloat
    max_ms: NonNegFloat

    def __post_init__(self) -> None:
        """Check the bounds.

        Raises:
            ValueError: when ``max_ms < min_ms`` (reported as ``msgspec.ValidationError`` on decode).
        """
        if self.max_ms < self.min_ms:
            raise ValueError(f"max_ms ({self.max_ms}) must be >= min_ms ({self.min_ms})")


class NormalLatency(Struct, tag="normal", tag_field="dist", kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Each call waits a normal draw (mean ``mean_ms``, deviation ``stddev_ms``), clamped at 0 ms."""

    mean_ms: NonNegFloat
    stddev_ms: NonNegFloat


Latency = FixedLatency | UniformLatency | NormalLatency


class FaultRule(Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults for one provider or one model: a schedule, probabilities, latency, a default.

    ``probabilities`` maps a status code (``"429"``) or an action name
    (``"hang"``, ``"reset"``, ``"malformed_json"``, ``"empty_content"``,
    ``"invalid_json_schema"``) to its chance per call (0..1, summing to <= 1).
    """

    schedule: list[FaultStep] = []
    probabilities: dict[str, Probability] = {}
    latency: Latency | None = None
    default: FaultStep | None = None

    def __post_init__(self) -> None:
        """Check probability keys and their sum.

        Raises:
            ValueError: for an unknown key, or probabilities summing above 1.
        """
        for key in self.probabilities:
            if key in ACTIONS and key not in ("ok", "error"):
                continue
            if key.isdigit() and 100 <= int(key) <= 599:
                continue
            raise ValueError(
                f"probability key {key!r} is neither a status code "
                "nor one of hang, reset, malformed_json, empty_content, invalid_json_schema"
            )
        if sum(self.probabilities.values()) > 1.0 + 1e-9:
            raise ValueError(f"probabilities sum to {sum(self.probabilities.values()):.3f} > 1")


class ProviderFaults(FaultRule, kw_only=True, forbid_unknown_fields=True):
    """A target's ``FaultRule``, per-model rules in ``models`` (model id -> rule), and its dialect.

    The dialect lets a deployment target behave like the OpenAI-compatible
    servers it stands for: ``omit_usage`` answers without ``usage`` (some
    servers send none), ``error_body`` shapes error answers as OpenAI's
    (``native``), vLLM's ``{"object": "error", "message", "type", "param",
    "code"}`` (``vllm``) or Ollama's ``{"error": "text"}`` (``plain``).
    """

    models: dict[str, FaultRule] = {}
    omit_usage: bool = False
    error_body: Literal["native", "vllm", "plain"] = "native"


class FaultProfile(Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole fault document (see the module docstring).

    ``seed`` seeds the RNG used for probabilities and latency draws (``None``:
    0). ``providers`` holds the rules of each target (a built-in provider or a
    deployment name). ``extra_models`` adds model ids, per built-in provider,
    that the emulator accepts besides the catalog's (deployment targets
    accept any model). ``reply_words`` sets how many words every answer's body
    has (default 8), the same for every target, so that an answer one target
    began another can finish (a stream continuation, DESIGN A9).
    """

    seed: int | None = None
    reply_words: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    providers: dict[Provider, ProviderFaults] = {}
    extra_models: dict[Provider, list[str]] = {}


def parse_profile(data: Any) -> FaultProfile:
    """Validate a profile given as built-in objects (a dict from JSON or TOML).

    String keys are converted to the declared key types (TOML has only strings).

    Raises:
        msgspec.ValidationError: with the path of the offending field.
    """
    try:
        return msgspec.convert(data, FaultProfile, str_keys=True)
    except msgspec.ValidationError as exc:
        raise _named(exc, data) from None


def _named(exc: msgspec.ValidationError, data: Any) -> msgspec.ValidationError:
    """``exc`` with the target name in its path (msgspec writes ``$.providers[...]`` for a dict entry)."""
    if not isinstance(data, dict):
        return exc
    for table, entry_type in (("providers", ProviderFaults), ("extra_models", list[str])):
        entries = data.get(table)
        if f"$.{table}[...]" not in str(exc) or not isinstance(entries, dict):
            continue
        for name, entry in entries.items():
            try:
                msgspec.convert(entry, entry_type, str_keys=True)
            except msgspec.ValidationError as inner:
                where = f"$.{table}.{name}"
                message = str(inner).replace("`$", f"`{where}") if "`$" in str(inner) else f"{inner} - at `{where}`"
                return msgspec.ValidationError(message)
    return exc


def decode_profile_json(raw: bytes | str) -> FaultProfile:
    """Validate a profile given as JSON text.

    Raises:
        msgspec.ValidationError: with the path of the offending field.
        msgspec.DecodeError: when ``raw`` is not JSON.
    """
    return parse_profile(msgspec.json.decode(raw))


def load_profile(path: str | Path) -> FaultProfile:
    """Read and validate a TOML profile file.

    Raises:
        OSError: when the file cannot be read.
        tomllib.TOMLDecodeError: when it is not TOML.
        msgspec.ValidationError: with the path of the offending field.
    """
    with Path(path).open("rb") as f:
        return parse_profile(tomllib.load(f))
