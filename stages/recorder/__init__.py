"""Stage package: the cost-recorder, the single finalizer.

It prices usage and writes the response, the cost event and the cache.
"""
