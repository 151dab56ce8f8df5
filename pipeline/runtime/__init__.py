"""What every process runs on: the stage runner, settings and configuration, telemetry, logging, HTTP.

Imports ``pipeline.bus``, ``schemas`` and ``pipeline.errors`` only (DESIGN A1).
"""
