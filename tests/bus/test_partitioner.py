"""The producer's partitioner: the same partition as aiokafka's default (Kafka's murmur2) for every key."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from pipeline.bus.kafka import KeyHashPartitioner


def test_key_hash_partitioner_agrees_with_the_default_for_any_key_and_partition_count() -> None:
    rng = random.Random(7)
    mine = KeyHashPartitioner(size=64)  # small, so keys are also evicted and hashed again
    default = DefaultPartitioner()
    keys = [rng.randbytes(rng.randint(1, 48)) for _ in range(500)] + [b"req-1", "éé".encode(), b"\xff\x00"]
    for count in (1, 3, 4, 6, 12):
        partitions = list(range(count))
        for key in keys + keys[:50]:  # the second time from the cache (or after eviction)
            assert mine(key, partitions, partitions) == default(key, partitions, partitions)


def test_a_message_without_a_key_goes_to_an_available_partition() -> None:
    mine = KeyHashPartitioner()
    seen = {mine(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
    assert seen == {1, 3}
