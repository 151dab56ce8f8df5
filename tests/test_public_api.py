"""The public face (DESIGN A5): ``pipeline.__all__`` is pinned and every name resolves."""

from __future__ import annotations

import subprocess
import sys

import pipeline
import pipeline.errors

PUBLIC_NAMES = {
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
}


def test_all_is_pinned() -> None:
    assert set(pipeline.__all__) == PUBLIC_NAMES
    assert len(pipeline.__all__) == len(PUBLIC_NAMES)


def test_every_public_name_resolves() -> None:
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert callable(pipeline.create_ai_provider_manager)
    assert callable(pipeline.monitor_provider_health)
    assert set(pipeline.LOAD_BALANCING_STRATEGIES) == {
        "round_robin",
        "weighted",
        "least_latency",
        "cost_optimized",
        "priority",
    }


def test_typed_errors_come_from_pipeline_errors() -> None:
    for name in pipeline.__all__:
        if name.endswith("Error"):
            error = getattr(pipeline, name)
            assert error is getattr(pipeline.errors, name)
            assert issubclass(error, pipeline.errors.AIProviderError)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        _ = pipeline.NoSuchThing  # type: ignore[attr-defined]
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("pipeline.NoSuchThing resolved")


def test_the_console_script_and_module_entry_agree() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("aipipe ")
