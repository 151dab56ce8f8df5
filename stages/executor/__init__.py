"""Stage package: the provider executor: calls, retries and fallbacks along the candidate chain."""
