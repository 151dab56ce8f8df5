"""Pure routing decisions: who can serve a model, and in which order (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.runtime.config import PipelineConfig, ProviderConfig
from schemas.envelope import Candidate
from schemas.request import AIRequest
from stages.rules.catalog import deployment_model_info


@dataclass(frozen=True, slots=True)
class Resolution:
    """The providers able to serve a request, or why none is.

    ``error_type`` is ``model_not_found`` (no enabled provider serves the
    model) or ``invalid_request`` (one does, but a limit such as
    ``max_tokens_per_request`` rules every one out); ``message`` says which.
    """

    candidates: list[Candidate]
    error_type: str | None = None
    message: str = ""


def serving_providers(config: PipelineConfig, model: str) -> list[Candidate]:
    """Every enabled provider that serves ``model``, with the concrete model to ask it for.

    ``model`` is a model group (each member provider's model) or a concrete
    model listed in a provider's ``models``.
    """
    out: list[Candidate] = []
    group = config.model_groups.get(model)
    for name, provider in config.providers.items():
        if not provider.enabled:
            continue
        if group is not None and name in group:
            out.append(Candidate(provider=name, model=group[name]))
        elif model in provider.models:
            out.append(Candidate(provider=name, model=model))
    return out


def resolve(config: PipelineConfig, request: AIRequest) -> Resolution:
    """The candidates for ``request``: serving providers, allow-list applied, limits checked.

    A candidate is dropped when ``max_tokens`` exceeds its provider's
    ``max_tokens_per_request`` or its model's documented maximum output
    (``stages.rules.catalog``): a request a model group can serve through
    one member must not fail on another member's limit.
    """
    serving = serving_providers(config, request.model)
    if request.providers is not None:
        unknown = [p for p in request.providers if p not in config.providers]
        if unknown:
            return Resolution(
                [],
                "invalid_request",
                f"unknown provider(s) in `providers`: {', '.join(unknown)} "
                f"(known deployments: {', '.join(config.providers)})",
            )
        allowed = set(request.providers)
        allowed_serving = [c for c in serving if c.provider in allowed]
        if serving and not allowed_serving:
            disabled = {p for p in request.providers if not (config.providers.get(p) and config.providers[p].enabled)}
            listed = ", ".join(f"{p}: disabled" if p in disabled else p for p in request.providers)
            return Resolution(
                [],
                "model_not_found",
                f"none of the allowed providers ({listed}) serves model "
                f"{request.model!r}; enabled providers serving it: {', '.join(c.provider for c in serving)}",
            )
        serving = allowed_serving
        rank = {name: i for i, name in enumerate(request.providers)}
        serving.sort(key=lambda c: rank[c.provider])
    if not serving:
        known = sorted(set(config.model_groups) | {m for p in config.enabled_providers().values() for m in p.models})
        hint = f"; known models: {', '.join(known[:12])}" if known else ""
        return Resolution([], "model_not_found", f"no enabled provider serves model {request.model!r}{hint}")
    fitting = [c for c in serving if request.max_tokens <= config.providers[c.provider].max_tokens_per_request]
    if not fitting:
        limit = max(config.providers[c.provider].max_tokens_per_request for c in serving)
        return Resolution(
            [],
            "invalid_request",
            f"max_tokens {request.max_tokens} exceeds every provider's max_tokens_per_request (largest: {limit})",
        )
    within_output = [c for c in fitting if request.max_tokens <= _max_output(config, c)]
    if not within_output:
        largest = max(_max_output(config, c) for c in fitting)
        models = ", ".join(f"{c.provider}/{c.model} ({_max_output(config, c)})" for c in fitting)
        return Resolution(
            [],
            "invalid_request",
            f"max_tokens {request.max_tokens} exceeds the maximum output of every candidate model: {models}; "
            f"the largest is {largest}",
        )
    return Resolution(within_output)


def _max_output(config: PipelineConfig, candidate: Candidate) -> int:
    """The model's maximum output (tokens: the deployment's or the catalog's); unknown models are not limited here."""
    info = deployment_model_info(config, candidate.provider, candidate.model)
    return info.max_output_tokens if info is not None else 2**31


def order_by_priority(candidates: list[Candidate], providers: dict[str, ProviderConfig]) -> list[Candidate]:
    """Lowest ``priority`` first; ties keep their order (stable)."""
    return sorted(candidates, key=lambda c: providers[c.provider].priority)
