"""Shared state behind the stages: budget, rate-limit and cache stores, in-process or on Redis.

Imports ``stages.rules``, ``pipeline.runtime`` and below (DESIGN A1).
"""
