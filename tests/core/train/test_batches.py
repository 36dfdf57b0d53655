"""The prefetch thread: batches in order, an error in the thread raised in the consumer, and a consumer
that stops early (an OOM, a pruned trial) stops and joins the thread instead of leaving it blocked."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from freezeflow.core.train.batches import Batches, prefetch

IMAGES = np.arange(40 * 3 * 4 * 4, dtype=np.uint8).reshape(40, 3, 4, 4)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "freezeflow-prefetch"]


class BrokenRows(Batches):
    def take(self, positions):
        if positions[0] >= 20:
            raise OSError("the memmap went away")
        return super().take(positions)


def test_batches_arrive_in_order_and_the_thread_ends():
    order = np.arange(40)[::-1].copy()
    got = [chunk.tolist() for _, chunk in prefetch(Batches(IMAGES, np.arange(40), 0), order, 8, False)]
    assert got == [order[i:i + 8].tolist() for i in range(0, 40, 8)]
    assert not prefetch_threads()


def test_a_consumer_that_stops_early_stops_the_thread():
    with contextlib.closing(prefetch(Batches(IMAGES, np.arange(40), 0), np.arange(40), 4, False)) as stream:
        next(stream)  # the thread has filled the queue and waits to put the next batch
    assert not prefetch_threads()


def test_an_error_in_the_thread_is_raised_in_the_consumer():
    with pytest.raises(OSError, match="memmap went away"):
        list(prefetch(BrokenRows(IMAGES, np.arange(40), 0), np.arange(40), 4, False))
    assert not prefetch_threads()
