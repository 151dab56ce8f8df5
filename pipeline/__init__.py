"""aipipe runtime: bus, stage runner, embedded broker, settings, client, CLI (DESIGN A1).

The public face is the seed's API (DESIGN A5): ``create_ai_provider_manager``,
``AIProviderManager``, ``LOAD_BALANCING_STRATEGIES`` and the typed errors.
"""

from typing import TYPE_CHECKING, Any

from pipeline.errors import (
    AIProviderError,
    AllProvidersFailedError,
    AuthenticationError,
    BudgetExceededError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderServerError,
    ProviderTimeoutError,
    RateLimitError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from pipeline.health_monitor import monitor_provider_health
    from pipeline.manager import LOAD_BALANCING_STRATEGIES, AIProviderManager, create_ai_provider_manager

_LAZY = {
    "LOAD_BALANCING_STRATEGIES": "pipeline.manager",
    "AIProviderManager": "pipeline.manager",
    "create_ai_provider_manager": "pipeline.manager",
    "monitor_provider_health": "pipeline.health_monitor",
}


def __getattr__(name: str) -> Any:
    """Import the manager lazily, so ``stages`` can import ``pipeline`` modules without a cycle."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "LOAD_BALANCING_STRATEGIES",
    "AIProviderError",
    "AIProviderManager",
    "AllProvidersFailedError",
    "AuthenticationError",
    "BudgetExceededError",
    "ContentFilterError",
    "ContextLengthExceededError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ProviderServerError",
    "ProviderTimeoutError",
    "RateLimitError",
    "ServiceUnavailableError",
    "create_ai_provider_manager",
    "monitor_provider_health",
]
