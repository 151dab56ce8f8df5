"""Stage package: the circuit breaker: folds health events into per-provider circuits and publishes each transition."""
