"""The bus: one small protocol (publish; consume in a group or as a broadcast; commit) and its implementations.

``protocol`` (the ``Bus`` protocol, records, errors), ``kafka`` (aiokafka, any
Kafka-compatible broker), ``memory`` (in-process, anyio), ``broker`` (the
embedded Tansu broker, the runtime file, broker discovery), ``topics`` (names).
Imports ``schemas`` and ``pipeline.errors`` only (DESIGN A1).
"""
