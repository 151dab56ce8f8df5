"""Builds and runs a set of stages: the pipeline of ``aipipe run`` and the in-process one of the manager and ``serve``.

``process`` opens what a process needs (bus, embedded broker, configuration,
provider endpoints, emulator); ``build`` makes one runner per stage over
shared resources and runs them. Imports the stages and everything below them.
"""
