"""Price table and cost arithmetic: USD per million tokens, in ``Decimal`` (DESIGN A4 money rules).

The cost-recorder prices every answer from the usage the provider *reported*;
the budget gate reserves :func:`worst_case_cost` before a call. Amounts stay
``Decimal`` throughout; only :func:`round_usd` turns one into the JSON number
that is published (10 decimal places, ``ROUND_HALF_EVEN``).

Prices live in ``stages/rules/data/prices.toml`` (packaged; one ``[provider."model"]``
table per model, each with ``source`` URL and ``as_of`` date), loaded with
:meth:`PriceTable.load`. Sources of the packaged numbers:

- OpenAI: https://platform.openai.com/docs/pricing
- Anthropic: https://docs.anthropic.com/en/docs/about-claude/pricing
- Cloudflare Workers AI: https://developers.cloudflare.com/workers-ai/platform/pricing/
  (billed in Neurons at USD 0.011 per 1,000 Neurons; the table stores the
  Neurons per million tokens and the resulting USD per million tokens)

Cost of one answer, all token counts from :class:`schemas.response.Usage`::

    uncached = max(0, prompt_tokens - cached_prompt_tokens - cache_creation_prompt_tokens)
    cost_usd = (uncached                      * input
                + cached_prompt_tokens         * (cached_input or input)
                + cache_creation_prompt_tokens * (cache_write or input)
                + completion_tokens            * output) / 1_000_000

``prompt_tokens`` includes the cached and cache-written tokens (DESIGN A4), so
an OpenAI-style usage (1,000 prompt tokens of which 800 cached) and an
Anthropic-style one (200 input + 800 cache reads, folded by the adapter into
``prompt_tokens=1000, cached_prompt_tokens=800``) cost the same.

Model names: :meth:`PriceTable.lookup` tries the exact id (or a listed alias)
first, then the id with a trailing date removed, ``-YYYY-MM-DD`` (OpenAI,
``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``) or ``-YYYYMMDD`` (Anthropic,
``claude-haiku-4-5-20251001`` -> ``claude-haiku-4-5``). Nothing else is
guessed: a model that is not found is priced with the provider's
``default_cost_per_token`` (``price_source="default"``) or not at all
(``price_source="none"``, cost 0), with a warning logged once per
(provider, model).

Deployments (DESIGN A10, :meth:`PriceTable.with_deployments`): a deployment's
own ``prices`` win over the table for every model it serves
(``price_source="deployment"``); otherwise its models are looked up, by the
model name the provider reports, in its type's section (``openai`` and
``azure_openai``: ``openai``; ``anthropic``; ``cloudflare``) or, for an
``openai_compatible`` deployment, in every section in file order (a router
such as OpenRouter serving ``gpt-4o-mini`` is priced as OpenAI's). A table
match never overrides a deployment's own prices.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pipeline.runtime.config import PipelineConfig
from schemas.response import Usage

__all__ = [
    "DEFAULT_PRICES_RESOURCE",
    "TOKENS_PER_MTOK",
    "Costing",
    "Price",
    "PriceSource",
    "PriceTable",
    "normalize_model",
    "round_usd",
    "worst_case_cost",
]

log = logging.getLogger(__name__)

#: Where :meth:`PriceTable.load` finds the packaged table, relative to the ``stages`` package.
DEFAULT_PRICES_RESOURCE = "data/prices.toml"

#: Tokens per priced unit: every price is USD per million tokens.
TOKENS_PER_MTOK = Decimal(1_000_000)

#: How a cost was obtained: the price table, the provider's ``default_cost_per_token``, or nothing.
PriceSource = Literal["table", "deployment", "default", "none"]

_PUBLISH_QUANTUM = Decimal("1e-10")  # DESIGN A4: cost_usd is published with 10 decimal places
_DATED_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")

# Fields of one model entry in prices.toml.
_F_INPUT = "usd_per_mtok_input"
_F_OUTPUT = "usd_per_mtok_output"
_F_CACHED = "usd_per_mtok_cached_input"
_F_WRITE = "usd_per_mtok_cache_write"
_F_N_INPUT = "neurons_per_mtok_input"
_F_N_OUTPUT = "neurons_per_mtok_output"
_F_N_RATE = "usd_per_1k_neurons"
_NEURON_FIELDS = (_F_N_INPUT, _F_N_OUTPUT, _F_N_RATE)
_ALLOWED_FIELDS = frozenset(
    {
        _F_INPUT,
        _F_OUTPUT,
        _F_CACHED,
        _F_WRITE,
        *_NEURON_FIELDS,
        "source",
        "as_of",
        "confirmed",
        "aliases",
        "note",
    }
)


@dataclass(frozen=True, slots=True)
class Price:
    """The price of one provider model, each rate in USD per million tokens (``Decimal``).

    ``input`` applies to uncached prompt tokens, ``output`` to completion
    tokens, ``cached_input`` to prompt tokens read from the provider's prompt
    cache and ``cache_write`` to prompt tokens written to it (Anthropic); either
    of the last two, when ``None``, falls back to ``input``. ``source`` is the
    URL the numbers come from, ``as_of`` the date they were checked there, and
    ``confirmed`` is false where a number could not be confirmed at the source.
    """

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    source: str = ""
    as_of: date | None = None
    confirmed: bool = True

    @property
    def cached_input_rate(self) -> Decimal:
        """USD per million cache-read prompt tokens (``cached_input``, else ``input``)."""
        return self.input if self.cached_input is None else self.cached_input

    @property
    def cache_write_rate(self) -> Decimal:
        """USD per million cache-written prompt tokens (``cache_write``, else ``input``)."""
        return self.input if self.cache_write is None else self.cache_write

    def cost(self, usage: Usage) -> Decimal:
        """Return what ``usage`` costs at this price, in USD (exact ``Decimal``, not rounded).

        Uncached prompt tokens are ``prompt_tokens`` less the cached and the
        cache-written ones, never below zero; see the module docstring.
        """
        cached = usage.cached_prompt_tokens
        written = usage.cache_creation_prompt_tokens
        uncached = max(0, usage.prompt_tokens - cached - written)
        total = (
            uncached * self.input
            + cached * self.cached_input_rate
            + written * self.cache_write_rate
            + usage.completion_tokens * self.output
        )
        return total / TOKENS_PER_MTOK


class Costing(NamedTuple):
    """The cost of one answer: ``cost_usd`` (USD, exact ``Decimal``) and where its price came from."""

    cost_usd: Decimal
    price_source: PriceSource


def normalize_model(model: str) -> str:
    """Return ``model`` without a trailing release date (``-YYYY-MM-DD`` or ``-YYYYMMDD``).

    ``"gpt-4o-mini-2024-07-18"`` -> ``"gpt-4o-mini"``,
    ``"claude-haiku-4-5-20251001"`` -> ``"claude-haiku-4-5"``; any other id is
    returned unchanged.
    """
    return _DATED_SUFFIX.sub("", model)


def round_usd(amount: Decimal) -> float:
    """Round a USD amount to 10 decimal places (``ROUND_HALF_EVEN``) for publishing as a JSON number."""
    return float(amount.quantize(_PUBLISH_QUANTUM, rounding=ROUND_HALF_EVEN))


def worst_case_cost(price: Price, prompt_tokens_estimate: int, max_tokens: int) -> Decimal:
    """Return the most a call can cost at ``price``, in USD, for the budget gate's reservation.

    Every estimated prompt token is charged at the dearer of the input and
    cache-write prices (a cache write costs more than plain input at
    Anthropic), and all ``max_tokens`` completion tokens at the output price.
    Both counts are tokens and must not be negative.
    """
    if prompt_tokens_estimate < 0:
        raise ValueError(f"prompt_tokens_estimate must be >= 0 tokens, got {prompt_tokens_estimate}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 tokens, got {max_tokens}")
    prompt_rate = max(price.input, price.cache_write_rate)
    return (prompt_tokens_estimate * prompt_rate + max_tokens * price.output) / TOKENS_PER_MTOK


class PriceTable:
    """Prices per (provider, model), loaded from TOML; see the module docstring for lookup rules.

    Build one with :meth:`load` (a TOML file, by default the packaged
    ``stages/rules/data/prices.toml``) or :meth:`from_mapping`. A table is read-only
    after construction, apart from the set of (provider, model) pairs already
    warned about.
    """

    def __init__(
        self,
        prices: Mapping[str, Mapping[str, Price]],
        aliases: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """Wrap ``prices`` (provider -> model -> price) and ``aliases`` (provider -> alias -> model)."""
        self._prices: dict[str, dict[str, Price]] = {p: dict(models) for p, models in prices.items()}
        self._names: dict[str, dict[str, str]] = {}
        for provider, models in self._prices.items():
            names = {model: model for model in models}
            for alias, target in (aliases or {}).get(provider, {}).items():
                if target not in models:
                    raise ValueError(f"{provider}.{alias!r}: alias of unknown model {target!r}")
                names.setdefault(alias, target)
            self._names[provider] = names
        self._warned: set[tuple[str, str, PriceSource]] = set()
        # deployment name -> (sections to look its models up in, its own price or None)
        self._deployments: dict[str, tuple[tuple[str, ...], Price | None]] = {}

    def with_deployments(self, config: PipelineConfig) -> PriceTable:
        """A view of this table for ``config``'s deployments (module docstring); this table is unchanged.

        Returns:
            A table sharing these prices that also answers for every deployment name.
        """
        table = PriceTable.__new__(PriceTable)
        table._prices, table._names, table._warned = self._prices, self._names, self._warned
        table._deployments = {}
        for name, cfg in config.providers.items():
            kind = config.type_of(name)
            family = {"azure_openai": "openai", "openai_compatible": ""}.get(kind, kind)
            sections = (family,) if family else tuple(self._prices)
            own = None
            if cfg.prices is not None:
                own = Price(
                    input=_number(cfg.prices.input_per_mtok, f"{name}.prices.input_per_mtok"),
                    output=_number(cfg.prices.output_per_mtok, f"{name}.prices.output_per_mtok"),
                    cached_input=None
                    if cfg.prices.cached_input_per_mtok is None
                    else _number(cfg.prices.cached_input_per_mtok, f"{name}.prices.cached_input_per_mtok"),
                    cache_write=None
                    if cfg.prices.cache_write_per_mtok is None
                    else _number(cfg.prices.cache_write_per_mtok, f"{name}.prices.cache_write_per_mtok"),
                    source=f"the configuration of deployment {name}",
                )
            table._deployments[name] = (sections, own)
        return table

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """Read a price table from the TOML file at ``path`` (default: the packaged ``prices.toml``).

        Raises ``ValueError`` naming the file and the offending key when the
        file is not valid TOML or an entry is malformed; ``OSError`` when the
        file cannot be read.
        """
        if path is None:
            resource = resources.files("stages.rules")
            for part in DEFAULT_PRICES_RESOURCE.split("/"):
                resource = resource.joinpath(part)
            origin = f"stages/rules/{DEFAULT_PRICES_RESOURCE}"
            text = resource.read_text(encoding="utf-8")
        else:
            origin = str(path)
            text = Path(path).read_text(encoding="utf-8")
        return cls.loads(text, origin=origin)

    @classmethod
    def loads(cls, text: str, *, origin: str = "<string>") -> PriceTable:
        """Parse a price table from TOML ``text``; ``origin`` names it in error messages."""
        try:
            data = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{origin}: not valid TOML: {exc}") from exc
        return cls.from_mapping(data, origin=origin)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "<mapping>") -> PriceTable:
        """Build a table from ``{provider: {model: entry}}``, each entry shaped as in ``prices.toml``.

        Numbers may be ``int``, ``Decimal``, ``float`` (taken by its shortest
        repr) or numeric strings; ``as_of`` a ``date`` or an ISO date string.
        Raises ``ValueError`` naming ``origin`` and the bad key, e.g.
        ``prices.toml: openai."gpt-4o".usd_per_mtok_input: ...``.
        """
        prices: dict[str, dict[str, Price]] = {}
        aliases: dict[str, dict[str, str]] = {}
        for provider, models in data.items():
            if not isinstance(models, Mapping):
                raise ValueError(f"{origin}: {provider}: expected a table of models, got {_kind(models)}")
            prices[provider] = {}
            aliases[provider] = {}
            for model, entry in models.items():
                where = f"{provider}.{_quote(model)}"
                if not isinstance(entry, Mapping):
                    raise ValueError(f"{origin}: {where}: expected a table of prices, got {_kind(entry)}")
                price, entry_aliases = _parse_entry(entry, f"{origin}: {where}")
                prices[provider][model] = price
                for alias in entry_aliases:
                    other = aliases[provider].setdefault(alias, model)
                    if other != model:
                        raise ValueError(f"{origin}: {where}.aliases: {alias!r} already aliases {other!r}")
            for alias, model in aliases[provider].items():
                if alias in prices[provider] and alias != model:
                    raise ValueError(f"{origin}: {provider}.{_quote(model)}.aliases: {alias!r} is a model of its own")
        return cls(prices, aliases)

    # -- queries --------------------------------------------------------------------------------

    def resolve(self, provider: str, model: str) -> str | None:
        """Return the table's name for ``model`` (exact id or alias, then undated), or ``None``.

        ``provider`` is a section of the table, or a deployment known through
        :meth:`with_deployments` (its sections are searched in order).
        """
        found = self._find(provider, model)
        return None if found is None else found[1]

    def _find(self, provider: str, model: str) -> tuple[str, str] | None:
        sections = self._deployments[provider][0] if provider in self._deployments else (provider,)
        for section in sections:
            names = self._names.get(section)
            if names is None:
                continue
            found = names.get(model) or names.get(normalize_model(model))
            if found is not None:
                return section, found
        return None

    def lookup(self, provider: str, model: str) -> Price | None:
        """Return the price of ``model`` at ``provider`` (a deployment's own price first), or ``None`` if unlisted."""
        own = self._deployments.get(provider, ((), None))[1]
        if own is not None:
            return own
        found = self._find(provider, model)
        return None if found is None else self._prices[found[0]][found[1]]

    def cost(
        self,
        provider: str,
        model: str,
        usage: Usage,
        *,
        default_cost_per_token: Decimal | None = None,
    ) -> Costing:
        """Return what ``usage`` of ``model`` at ``provider`` costs, in USD, and where the price came from.

        A deployment with its own prices: those, ``price_source`` ``"deployment"``.
        Listed model: the formula of the module docstring, ``price_source``
        ``"table"``. Unlisted model with ``default_cost_per_token`` (USD per
        token): that rate times every prompt and completion token,
        ``"default"``. Neither: cost 0 and ``"none"``; the caller decides what
        that means. The last two log a warning once per (provider, model).
        """
        own = self._deployments.get(provider, ((), None))[1]
        if own is not None:
            return Costing(own.cost(usage), "deployment")
        price = self.lookup(provider, model)
        if price is not None:
            return Costing(price.cost(usage), "table")
        if default_cost_per_token is not None:
            rate = _number(default_cost_per_token, "default_cost_per_token")
            self._warn_once(
                provider,
                model,
                "default",
                "no price for %s model %r in the price table; using its default_cost_per_token %s USD",
                rate,
            )
            return Costing(rate * (usage.prompt_tokens + usage.completion_tokens), "default")
        self._warn_once(
            provider,
            model,
            "none",
            "no price for %s model %r in the price table and no default_cost_per_token; costing it %s USD",
            Decimal(0),
        )
        return Costing(Decimal(0), "none")

    def items(self) -> Iterator[tuple[str, str, Price]]:
        """Yield ``(provider, model, price)`` for every entry, in file order."""
        for provider, models in self._prices.items():
            for model, price in models.items():
                yield provider, model, price

    def providers(self) -> list[str]:
        """Return the providers the table lists prices for."""
        return list(self._prices)

    def __len__(self) -> int:
        """Return the number of (provider, model) entries, aliases not counted."""
        return sum(len(models) for models in self._prices.values())

    def __repr__(self) -> str:
        """Show the size of the table."""
        return f"PriceTable({len(self)} models, providers={self.providers()})"

    def _warn_once(self, provider: str, model: str, kind: PriceSource, message: str, rate: Decimal) -> None:
        key = (provider, model, kind)
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(message, provider, model, rate)


# -- parsing helpers -------------------------------------------------------------------------------


def _parse_entry(entry: Mapping[str, Any], where: str) -> tuple[Price, list[str]]:
    """Validate one model entry; ``where`` prefixes every error (``origin: provider."model"``)."""
    for key in entry:
        if key not in _ALLOWED_FIELDS:
            raise ValueError(f"{where}.{key}: unknown field (allowed: {', '.join(sorted(_ALLOWED_FIELDS))})")

    values: dict[str, Decimal] = {}
    for key in (_F_INPUT, _F_OUTPUT, _F_CACHED, _F_WRITE, *_NEURON_FIELDS):
        if key in entry:
            values[key] = _number(entry[key], f"{where}.{key}")

    present = [key for key in _NEURON_FIELDS if key in values]
    if present:
        missing = [key for key in _NEURON_FIELDS if key not in values]
        if missing:
            raise ValueError(f"{where}.{missing[0]}: required with {present[0]} (Neuron pricing)")
        rate = values[_F_N_RATE]
        for usd_key, neuron_key in ((_F_INPUT, _F_N_INPUT), (_F_OUTPUT, _F_N_OUTPUT)):
            derived = values[neuron_key] * rate / 1000
            if usd_key not in values:
                values[usd_key] = derived
            elif values[usd_key] != derived:
                raise ValueError(
                    f"{where}.{usd_key}: {values[usd_key]} USD/MTok does not match "
                    f"{neuron_key} * {_F_N_RATE} / 1000 = {derived}"
                )

    for key in (_F_INPUT, _F_OUTPUT):
        if key not in values:
            raise ValueError(f"{where}.{key}: missing (USD per million tokens)")

    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{where}.source: missing or empty (the URL the prices come from)")

    confirmed = entry.get("confirmed", True)
    if not isinstance(confirmed, bool):
        raise ValueError(f"{where}.confirmed: expected true or false, got {_kind(confirmed)}")

    note = entry.get("note", "")
    if not isinstance(note, str):
        raise ValueError(f"{where}.note: expected a string, got {_kind(note)}")

    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ValueError(f"{where}.aliases: expected a list of model ids")

    price = Price(
        input=values[_F_INPUT],
        output=values[_F_OUTPUT],
        cached_input=values.get(_F_CACHED),
        cache_write=values.get(_F_WRITE),
        source=source.strip(),
        as_of=_date(entry.get("as_of"), f"{where}.as_of"),
        confirmed=confirmed,
    )
    return price, list(aliases)


def _number(value: object, where: str) -> Decimal:
    """Return ``value`` as a finite, non-negative ``Decimal``; raise ``ValueError`` naming ``where``."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got a boolean")
    try:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, int):
            number = Decimal(value)
        elif isinstance(value, float):
            number = Decimal(repr(value))
        elif isinstance(value, str):
            number = Decimal(value.strip())
        else:
            raise ValueError(f"{where}: expected a number, got {_kind(value)}")
    except InvalidOperation:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"{where}: expected a finite number >= 0, got {value!r}")
    return number


def _date(value: object, where: str) -> date:
    """Return ``value`` (a TOML date or an ISO ``YYYY-MM-DD`` string) as a ``date``."""
    if value is None:
        raise ValueError(f"{where}: missing (the date the prices were checked, YYYY-MM-DD)")
    if isinstance(value, datetime):
        raise ValueError(f"{where}: expected a date (YYYY-MM-DD), got a date-time")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{where}: expected a date (YYYY-MM-DD), got {value!r}")


def _quote(model: str) -> str:
    return f'"{model}"'


def _kind(value: object) -> str:
    return type(value).__name__
