"""The byte-bounded LRU cache: eviction, and computing each missing key once however many threads ask."""

from __future__ import annotations

import threading
import time

from segnext_backend.caches import LruCache


def sized(value: bytes) -> int:
    return len(value)


def test_least_recently_used_goes_first_and_bytes_stay_bounded():
    cache = LruCache(max_bytes=30, size_of=sized)
    cache.put("a", b"x" * 10)
    cache.put("b", b"x" * 10)
    cache.put("c", b"x" * 10)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", b"x" * 10)
    assert "b" not in cache and all(k in cache for k in "acd")
    stats = cache.stats()
    assert stats.bytes == 30 and stats.entries == 3 and stats.evictions == 1


def test_an_entry_larger_than_the_budget_is_returned_but_not_kept():
    cache = LruCache(max_bytes=5, size_of=sized)
    assert cache.get_or_compute("big", lambda: b"x" * 6) == b"x" * 6
    assert "big" not in cache and cache.stats().bytes == 0


def test_replacing_a_key_counts_its_bytes_once():
    cache = LruCache(max_bytes=100, size_of=sized)
    cache.put("a", b"x" * 40)
    cache.put("a", b"x" * 50)
    assert cache.stats().bytes == 50


def test_concurrent_requests_for_one_key_compute_it_once():
    cache = LruCache(max_bytes=1000, size_of=sized)
    calls = []
    started = threading.Event()

    def slow_compute():
        calls.append(threading.get_ident())
        started.set()
        time.sleep(0.3)
        return b"value"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow_compute))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1 and results == [b"value"] * 8
    assert cache.stats().misses == 1


def test_a_failed_computation_is_not_cached_and_every_waiter_sees_the_error():
    cache = LruCache(max_bytes=1000, size_of=sized)
    gate = threading.Event()

    def failing():
        gate.wait(2)
        raise ValueError("broken image")

    errors = []

    def ask():
        try:
            cache.get_or_compute("k", failing)
        except ValueError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert errors == ["broken image"] * 4
    assert "k" not in cache and not cache.is_pending("k")
    assert cache.get_or_compute("k", lambda: b"ok") == b"ok"


def test_different_keys_compute_in_parallel():
    cache = LruCache(max_bytes=1000, size_of=sized)
    barrier = threading.Barrier(2, timeout=2)

    def compute():
        barrier.wait()  # deadlocks (BrokenBarrierError) if one key blocked the other
        return b"v"

    threads = [threading.Thread(target=cache.get_or_compute, args=(key, compute)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert "a" in cache and "b" in cache


def test_zero_budget_keeps_nothing():
    cache = LruCache(max_bytes=0, size_of=sized)
    assert cache.get_or_compute("a", lambda: b"x") == b"x"
    assert cache.get("a") is None and cache.stats().entries == 0
