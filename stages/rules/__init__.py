"""Pure rules shared by several stages, the stores and the client (no I/O, DESIGN A1).

Pricing, budget windows (``ledger``), rate-limit windows, the circuit view, the
provider-budget view, routing strategies, model groups and candidates
(``routing``), the model catalog, token counting and the cache key. Imports
``pipeline.runtime`` and below, nothing above.
"""
