"""Runtime settings from the environment (DESIGN A7), frozen, with secrets masked.

Secrets (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ``CLOUDFLARE_API_TOKEN``,
and the variable each deployment names in ``api_key_env``) are held in
``Secret`` values whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.bus.topics import DEFAULT_PREFIX, Topics

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
DEFAULT_CLOUDFLARE_BASE_URL = "https://api.cloudflare.com/client/v4"


class Secret:
    """A secret string that never prints: ``repr`` and ``str`` give ``'***'``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; only for the HTTP header that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class EnvVars:
    """The process environment as read at start, for the variables deployments name (``api_key_env``...).

    Values come out only one at a time, a key as a ``Secret``; ``repr`` shows
    how many variables there are, never a name or value.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def secret(self, name: str) -> Secret | None:
        """The value of variable ``name`` as a ``Secret``, or ``None`` when unset or empty."""
        value = self._values.get(name)
        return Secret(value) if value else None

    def text(self, name: str) -> str | None:
        """The value of a variable that is not a secret (an account id), or ``None`` when unset or empty."""
        return self._values.get(name) or None

    def __repr__(self) -> str:
        return f"EnvVars({len(self._values)} variables)"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


#: Default window of stream time a de-duplicating stage remembers an id (s); ``AIPIPE_DEDUP_WINDOW_S``.
#: Redelivery reaches back over the messages in flight when a replica stopped: with the defaults
#: about 20 s of stream time (a 6 s session timeout, a rebalance, a drain of at most 10 s).
DEFAULT_DEDUP_WINDOW_S = 60.0
#: Default most ids one de-duplication memory holds; ``AIPIPE_DEDUP_MAX_IDS`` (about 120 bytes each).
DEFAULT_DEDUP_MAX_IDS = 100_000


def _int_env(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number > 0, got {raw!r}") from exc
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a number > 0, got {raw!r}")
    return value


def _at_least(env: Mapping[str, str], name: str, lowest: int, default: int) -> int:
    value = _int_env(env, name, default)
    if value is None or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {env.get(name)!r}")
    return value


@dataclass(frozen=True, slots=True)
class ProviderEndpoint:
    """Where and how to reach one provider: base URL and credentials (masked)."""

    base_url: str
    api_key: Secret | None = None
    account_id: str | None = None
    api_version: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the runtime reads from the environment.

    ``env_name``: ``development`` | ``production``. ``kafka_bootstrap``: ``None``
    means the runtime file or the embedded broker (DESIGN A6). ``redis_url``:
    ``None`` keeps state in-process. ``emulate``: point every provider at the
    emulator (``emulator_url`` when set, else one started in-process).
    ``max_in_flight``: messages one stage handles at once. ``drain_grace_s``: how long a
    stopping process lets in-flight work finish (s, ``AIPIPE_DRAIN_GRACE_S``) before it
    abandons the rest, uncommitted. ``dedup_window_s`` and ``dedup_max_ids``: the memory
    of ids the cost-recorder and the budget ledger de-duplicate with
    (``stages.rules.recent_ids``; ``AIPIPE_DEDUP_WINDOW_S``, ``AIPIPE_DEDUP_MAX_IDS``).
    ``archive_dir``: ``AIPIPE_ARCHIVE_DIR`` (``None``: ``<home>/archive``, see ``archive_path``).
    """

    env_name: str = "development"
    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    topic_prefix: str = DEFAULT_PREFIX
    home: Path = field(default_factory=lambda: Path.home() / ".aipipe")
    config_path: Path | None = None
    emulate: bool = False
    emulator_url: str | None = None
    openai: ProviderEndpoint = ProviderEndpoint(DEFAULT_OPENAI_BASE_URL)
    anthropic: ProviderEndpoint = ProviderEndpoint(DEFAULT_ANTHROPIC_BASE_URL)
    cloudflare: ProviderEndpoint = ProviderEndpoint(DEFAULT_CLOUDFLARE_BASE_URL)
    metrics_port: int | None = None
    api_keys_path: Path | None = None
    log_level: str = "INFO"
    max_in_flight: int = 512
    response_timeout_slack_ms: int = 5_000
    drain_grace_s: float = 30.0
    dedup_window_s: float = DEFAULT_DEDUP_WINDOW_S
    dedup_max_ids: int = DEFAULT_DEDUP_MAX_IDS
    archive_dir: Path | None = None
    env_vars: EnvVars = field(default_factory=lambda: EnvVars({}), repr=False, compare=False)

    @property
    def archive_path(self) -> Path:
        """The archive directory (DESIGN A11): ``AIPIPE_ARCHIVE_DIR``, else ``$AIPIPE_HOME/archive``."""
        return self.archive_dir if self.archive_dir is not None else self.home / "archive"

    @property
    def topics(self) -> Topics:
        """Topic names under ``topic_prefix``."""
        return Topics(self.topic_prefix)

    def endpoint(self, provider: str) -> ProviderEndpoint:
        """The endpoint of ``provider``.

        Raises:
            KeyError: for an unknown provider name.
        """
        endpoints = {"openai": self.openai, "anthropic": self.anthropic, "cloudflare": self.cloudflare}
        return endpoints[provider]

    def secret_values(self, extra_vars: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Every credential this process knows: the built-in keys, Cloudflare's account id, and ``extra_vars``.

        For scrubbing texts that go into events (a provider may echo any credential in an error).
        """
        values = [
            ep.api_key.reveal() for ep in (self.openai, self.anthropic, self.cloudflare) if ep.api_key is not None
        ]
        values += [v for v in (self.cloudflare.account_id,) if v]
        values += [s.reveal() for var in extra_vars if (s := self.env_vars.secret(var)) is not None]
        return tuple(dict.fromkeys(v for v in values if v))

    def has_key(self, provider: str) -> bool:
        """Whether credentials for ``provider`` are set (Cloudflare needs token and account id)."""
        ep = self.endpoint(provider)
        if provider == "cloudflare":
            return ep.api_key is not None and bool(ep.account_id)
        return ep.api_key is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, env_name: str | None = None) -> Settings:
        """Read the settings of DESIGN A7 from ``env`` (default ``os.environ``).

        Raises:
            ValueError: naming the variable, for a malformed value.
        """
        e = os.environ if env is None else env
        name = env_name or e.get("AIPIPE_ENV") or "development"
        if name not in ("development", "production"):
            raise ValueError(f"AIPIPE_ENV must be 'development' or 'production', got {name!r}")

        def secret(var: str) -> Secret | None:
            value = e.get(var)
            return Secret(value) if value else None

        home = Path(e["AIPIPE_HOME"]).expanduser() if e.get("AIPIPE_HOME") else Path.home() / ".aipipe"
        max_in_flight = _int_env(e, "AIPIPE_MAX_IN_FLIGHT", 512) or 512
        return cls(
            env_name=name,
            kafka_bootstrap=e.get("AIPIPE_KAFKA_BOOTSTRAP") or None,
            redis_url=e.get("AIPIPE_REDIS_URL") or None,
            topic_prefix=e.get("AIPIPE_TOPIC_PREFIX") or DEFAULT_PREFIX,
            home=home,
            config_path=Path(e["AIPIPE_CONFIG"]).expanduser() if e.get("AIPIPE_CONFIG") else None,
            emulate=_truthy(e.get("AIPIPE_EMULATE")),
            emulator_url=e.get("AIPIPE_EMULATOR_URL") or None,
            openai=ProviderEndpoint(
                (e.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL).rstrip("/"), secret("OPENAI_API_KEY")
            ),
            anthropic=ProviderEndpoint(
                (e.get("ANTHROPIC_BASE_URL") or DEFAULT_ANTHROPIC_BASE_URL).rstrip("/"),
                secret("ANTHROPIC_API_KEY"),
            ),
            cloudflare=ProviderEndpoint(
                (e.get("CLOUDFLARE_BASE_URL") or DEFAULT_CLOUDFLARE_BASE_URL).rstrip("/"),
                secret("CLOUDFLARE_API_TOKEN"),
                e.get("CLOUDFLARE_ACCOUNT_ID") or None,
            ),
            metrics_port=_int_env(e, "AIPIPE_METRICS_PORT", None),
            api_keys_path=Path(e["AIPIPE_API_KEYS"]).expanduser() if e.get("AIPIPE_API_KEYS") else None,
            log_level=(e.get("LOG_LEVEL") or "INFO").upper(),
            max_in_flight=max_in_flight,
            drain_grace_s=float(_int_env(e, "AIPIPE_DRAIN_GRACE_S", 30) or 0),
            dedup_window_s=_positive(e, "AIPIPE_DEDUP_WINDOW_S", DEFAULT_DEDUP_WINDOW_S),
            dedup_max_ids=_at_least(e, "AIPIPE_DEDUP_MAX_IDS", 2, DEFAULT_DEDUP_MAX_IDS),
            archive_dir=Path(e["AIPIPE_ARCHIVE_DIR"]).expanduser() if e.get("AIPIPE_ARCHIVE_DIR") else None,
            env_vars=EnvVars(e),
        )
