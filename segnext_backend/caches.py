"""A least-recently-used cache bounded in bytes, shared by threads, computing each key once.

Both the image features and the per-object click states live in one of these. `get_or_compute` is
"single-flight": when two requests want the same missing key at once (two annotators opening one image, a
click arriving while the task-open pre-encode runs), the first computes and the others wait for its result,
so an image is never encoded twice. A computation that fails caches nothing, and every waiter gets its error.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


class LruCache(Generic[K, V]):
    def __init__(self, max_bytes: int, size_of: Callable[[V], int]):
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._pending: dict[K, Future] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: K, value: V) -> None:
        size = self._size_of(value)
        with self._lock:
            self._put_locked(key, value, size)

    def _put_locked(self, key: K, value: V, size: int) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.max_bytes:
            return  # larger than the whole budget: served once, never kept
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self._bytes -= evicted_size
            self._evictions += 1

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[0]
            future = self._pending.get(key)
            owner = future is None
            if owner:
                self._misses += 1
                future = self._pending[key] = Future()
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as error:
            with self._lock:
                del self._pending[key]
            future.set_exception(error)
            raise
        size = self._size_of(value)
        with self._lock:
            del self._pending[key]
            self._put_locked(key, value, size)
        future.set_result(value)
        return value

    def discard(self, key: K) -> None:
        """Remove the entry, if there is one."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    def is_pending(self, key: K) -> bool:
        with self._lock:
            return key in self._pending

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )
