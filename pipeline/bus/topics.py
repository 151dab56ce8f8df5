"""Topic names (DESIGN A3), all under one prefix (``AIPIPE_TOPIC_PREFIX``, default ``ai.``)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "ai."


@dataclass(frozen=True, slots=True)
class Topics:
    """The pipeline's topic names for one prefix.

    Keyed by request id: ``requests``, the four ``stage_*`` topics,
    ``responses``, ``costs``; ``control`` is keyed by provider (or ``*``);
    ``deadletter`` keeps the original key.
    """

    prefix: str = DEFAULT_PREFIX

    @property
    def requests(self) -> str:
        """Applications publish ``AIRequest`` values here."""
        return f"{self.prefix}requests"

    @property
    def stage_budget(self) -> str:
        """cache-lookup (miss) -> budget-gate."""
        return f"{self.prefix}stage.budget"

    @property
    def stage_route(self) -> str:
        """budget-gate -> router."""
        return f"{self.prefix}stage.route"

    @property
    def stage_execute(self) -> str:
        """Router -> executor (envelope with the candidate chain)."""
        return f"{self.prefix}stage.execute"

    @property
    def stage_record(self) -> str:
        """Every outcome -> cost-recorder (the single finalizer)."""
        return f"{self.prefix}stage.record"

    @property
    def responses(self) -> str:
        """Final ``AIResponse`` values, written by the cost-recorder only."""
        return f"{self.prefix}responses"

    @property
    def control(self) -> str:
        """Health, circuit, budget, cache and command events."""
        return f"{self.prefix}control"

    @property
    def costs(self) -> str:
        """One ``CostEvent`` per ``status: ok`` request id."""
        return f"{self.prefix}costs"

    @property
    def stream(self) -> str:
        """``StreamChunk`` values of streamed answers (DESIGN A9), keyed by request id."""
        return f"{self.prefix}stream"

    @property
    def deadletter(self) -> str:
        """Values no stage could decode or validate."""
        return f"{self.prefix}deadletter"

    def all(self) -> list[str]:
        """Every topic, in pipeline order."""
        return [
            self.requests,
            self.stage_budget,
            self.stage_route,
            self.stage_execute,
            self.stage_record,
            self.responses,
            self.control,
            self.costs,
            self.stream,
            self.deadletter,
        ]

    def is_stream_topic(self, topic: str) -> bool:
        """Whether ``topic`` may carry stream chunks: ``stream`` itself or a topic under ``<stream>.``.

        A request's ``stream_topic`` must be one, so that no request can make
        the executor write into ``control`` or another pipeline topic.
        """
        return topic == self.stream or (topic.startswith(f"{self.stream}.") and len(topic) > len(self.stream) + 1)

    def keyed_by_request_id(self, topic: str) -> bool:
        """Whether a record's key on ``topic`` is a request id (DESIGN A4)."""
        return topic == self.requests or topic.startswith(f"{self.prefix}stage.")

    def carries_request_key(self, topic: str) -> bool:
        """Whether a record on ``topic`` is about one request and so keeps that request's key bytes.

        True for the request path, ``responses``, ``costs`` and ``deadletter``;
        false for ``control`` (keyed by provider or ``*``).
        """
        return topic != self.control and (
            self.keyed_by_request_id(topic)
            or topic in (self.responses, self.costs, self.deadletter)
            or self.is_stream_topic(topic)
        )

    def short(self, name: str) -> str:
        """Full topic name for a short name (``responses``, ``deadletter``, ``stream.<name>``) or the full name.

        Raises:
            ValueError: for an unknown short name.
        """
        mapping = {t.removeprefix(self.prefix): t for t in self.all()}
        if name in mapping.values() or self.is_stream_topic(name):  # the full name (``ai.responses``) is fine too
            return name
        if self.is_stream_topic(self.prefix + name):  # a private stream topic: ``stream.serve-host-8000``
            return self.prefix + name
        if name not in mapping:
            raise ValueError(f"unknown topic {name!r}; one of: {', '.join(sorted(mapping))}")
        return mapping[name]
