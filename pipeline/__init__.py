"""aipipe: the public face (DESIGN A5) over the runtime's layers (DESIGN A1).

The public names are the seed's API: ``create_ai_provider_manager``,
``AIProviderManager``, ``LOAD_BALANCING_STRATEGIES``,
``monitor_provider_health`` and the typed errors of ``pipeline.errors``. The
client's names are imported on first use (PEP 562), so importing a low layer
(``pipeline.bus``, ``pipeline.runtime``) never loads the client. The layers,
bottom first: ``bus``, ``runtime``, ``stores``, ``emulator``, ``assembly``,
``client``, then ``cli``, ``serve`` and ``bench`` (``stages`` sits between
``runtime`` and ``stores`` for its rules, above ``emulator`` for the stages).
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
    InvalidResponseError,
    ModelNotFoundError,
    ProviderServerError,
    ProviderTimeoutError,
    RateLimitError,
    ServiceUnavailableError,
    StreamCancelledError,
    StreamInterruptedError,
)

if TYPE_CHECKING:
    from pipeline.client.health_watch import monitor_provider_health
    from pipeline.client.manager import LOAD_BALANCING_STRATEGIES, AIProviderManager, create_ai_provider_manager

_LAZY = {
    "LOAD_BALANCING_STRATEGIES": "pipeline.client.manager",
    "AIProviderManager": "pipeline.client.manager",
    "create_ai_provider_manager": "pipeline.client.manager",
    "monitor_provider_health": "pipeline.client.health_watch",
}


def __getattr__(name: str) -> Any:
    """The client's public names, imported on first use (PEP 562), so low layers never load the client.

    Raises:
        AttributeError: for a name that is not public.
    """
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
    "InvalidResponseError",
    "ModelNotFoundError",
    "ProviderServerError",
    "ProviderTimeoutError",
    "RateLimitError",
    "ServiceUnavailableError",
    "StreamCancelledError",
    "StreamInterruptedError",
    "create_ai_provider_manager",
    "monitor_provider_health",
]
