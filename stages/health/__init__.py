"""Stage package: the health monitor: probes each provider it owns on an interval."""
