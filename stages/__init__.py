"""aipipe stages: one package per stage (its decision only), the provider adapters, and the shared rules.

``rules`` holds the pure rules that several stages, the stores and the client
share; ``cache``, ``budget``, ``router``, ``executor``, ``recorder``,
``breaker`` and ``health`` each hold one stage class (``stage``) and the
decisions only it uses; ``providers`` holds the adapters (wire formats). A
stage never imports another stage (DESIGN A1).
"""
