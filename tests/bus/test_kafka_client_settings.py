"""Kafka client choices: the producer's partitioner (aiokafka's default partitions, hashes cached), fetch waits."""

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


def test_a_background_reader_never_fetches_more_often_than_one_on_the_path() -> None:
    from pipeline.bus.kafka import KafkaSettings

    settings = KafkaSettings.from_env({})
    assert (settings.fetch_wait_ms(), settings.fetch_wait_ms(background=True)) == (10, 100)
    kafka_like = KafkaSettings.from_env({"AIPIPE_KAFKA_FETCH_MAX_WAIT_MS": "500"})
    assert kafka_like.fetch_wait_ms(background=True) == 500
    tuned = KafkaSettings.from_env({"AIPIPE_KAFKA_BACKGROUND_FETCH_MAX_WAIT_MS": "250"})
    assert tuned.fetch_wait_ms(background=True) == 250
