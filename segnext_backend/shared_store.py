"""Image features and object click states in Redis: a second tier behind each process's in-memory caches.

Why: several backend processes (gunicorn workers, containers behind a load balancer) each keep their own
caches, so a click that lands on another process would fetch and encode its image again (seconds of CPU) and
replay the object's clicks. With `REDIS_URL` set, every process writes what it computes here and reads what
it lacks from here first, so any process on any machine can serve any click of any object.

- Features are stored as float16 (6.3 MB per image). The process that encodes an image also goes on with the
  float16-rounded features itself, so every process decodes from the very same features and the fleet
  answers a click with the same mask bit for bit, whichever process serves it (docs/performance.md measures
  what float16 moves against float32).
- Object states (the decoder's float32 logits after a click sequence, 4 MB) are stored exactly as computed:
  a click served from a state read here gives the mask the process that computed it would give.
- An image is encoded once across the fleet: the first process to want it takes a lock (SET NX with an
  expiry) and renews it while it encodes; the others wait for the features to appear. A lock whose holder
  died (nobody renews it) expires, and a waiter then takes it and encodes itself. A holder that lives but
  hangs keeps renewing: a waiter gives up after `encode_wait_seconds` and encodes itself.
- Keys are a SHA-256 of the segmenter's own key object (its compared fields, so a task id that is not part
  of an image's identity is not part of the key either) under a namespace of the loaded model files'
  digests: a process with other model files never reads these values.
- Every entry expires `ttl_seconds` after it was last read or written. Redis's own `maxmemory` with an
  `allkeys-lru` policy bounds the memory (README, "Scaling out").

Faults: each Redis call is bounded by a short socket timeout and never retried on the spot. A connection
error or time-out marks Redis unavailable for `retry_seconds`, during which clicks go on with the in-process
caches alone (and /health says so); the first call after that tries again. Nothing is lost with a process
that dies: everything another process needs was written to Redis before the click that made it was answered.
A Redis that answers, but slowly, would cost every call of a click its delay (a replay makes dozens): within
`click()` (one click, one pre-encode) Redis calls stop once they have taken `click_budget_seconds`, and the
click goes on without Redis; such clicks are counted and reported (/health, /metrics). So a click spends at
most `click_budget_seconds`, the call in flight when it ran out and the release of an encode lock it holds
(never skipped: other processes wait on it) in Redis calls.

What is read is used only when it is exactly what this backend writes: the magic, the shape (features
FEATURE_SHAPE with a width and height of at least 1, states the decoder's logits shape), the length and
finite values. Anything else is a miss, computed again and overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .engine import FEATURE_SHAPE
from .geometry import MODEL_SIZE
from .settings import redact_url

logger = logging.getLogger(__name__)

FEATURES_MAGIC = b"SNF1"  # + width, height (uint32 LE) + float16 features, C order
STATE_MAGIC = b"SNS1"  # + rows, cols (uint32 LE) + float32 logits, C order
HEADER = struct.Struct("<4sII")
_FAILED = object()
STATE_SHAPE = (MODEL_SIZE, MODEL_SIZE)  # the decoder's logits
MAX_POLL_SECONDS = 0.25  # between looks for another process's features, once a wait has gone on a while
# How long after a click went over its Redis budget /health still reports Redis as slow.
SLOW_REPORT_SECONDS = 60.0

# Deleting or extending the lock only while it is still ours: after an expiry another process may hold it.
_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def stable_digest(key: Any) -> str:
    """A digest of a cache key that is the same in every process: dataclasses by their compared fields."""

    def canonical(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return [type(value).__name__] + [canonical(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare]
        if isinstance(value, (tuple, list)):
            return [canonical(item) for item in value]
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, bytes):
            return value.hex()
        return [type(value).__name__, repr(value)]

    return hashlib.sha256(json.dumps(canonical(key), separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass
class SharedStoreStats:
    feature_hits: int = 0
    feature_misses: int = 0
    feature_writes: int = 0
    state_hits: int = 0
    state_misses: int = 0
    state_writes: int = 0
    encode_waits: int = 0  # times this process waited for another process's encode
    encode_wait_timeouts: int = 0  # ... and gave up after encode_wait_seconds, encoding itself
    errors: int = 0
    seconds: float = 0.0  # spent in Redis calls, waiting for other processes' encodes excluded
    clicks_over_budget: int = 0  # clicks whose Redis calls took click_budget_seconds: the rest went without
    foreign_values: int = 0  # values under a backend key that were not exactly a state or features: misses


class SharedStore:
    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        ttl_seconds: int = 3600,
        socket_timeout: float = 1.0,
        retry_seconds: float = 10.0,
        lock_seconds: float = 15.0,
        poll_seconds: float = 0.05,
        click_budget_seconds: float = 1.0,
        encode_wait_seconds: float = 180.0,
    ):
        self.url = redact_url(url)
        self.namespace = namespace
        self.ttl_seconds = ttl_seconds
        self.retry_seconds = retry_seconds
        self.lock_ms = int(lock_seconds * 1000)
        self.poll_seconds = poll_seconds
        self.click_budget_seconds = click_budget_seconds
        self.encode_wait_seconds = encode_wait_seconds
        self._click = threading.local()  # .spent: seconds in Redis calls of the click this thread serves
        self._over_budget_at: float | None = None  # time.monotonic() of the last click over its budget
        # No retries inside the client: a failed call costs one time-out, then Redis is left alone a while.
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 0)
        )
        self._release = self._client.register_script(_RELEASE_LOCK)
        self._renew = self._client.register_script(_RENEW_LOCK)
        self.stats = SharedStoreStats()
        self._stats_lock = threading.Lock()
        self._down_until = 0.0
        self._last_error: str | None = None

    # -- fault handling -----------------------------------------------------------------------------------

    def _count(self, **increments) -> None:
        with self._stats_lock:
            for name, amount in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + amount)

    @contextmanager
    def click(self):
        """Redis calls made by this thread within the block share one budget of `click_budget_seconds`; once
        it is spent, they are skipped (as when Redis is unavailable). Nested blocks share the outer budget."""
        if getattr(self._click, "spent", None) is not None:
            yield
            return
        self._click.spent, self._click.over = 0.0, False
        try:
            yield
        finally:
            self._click.spent = None

    def _over_budget(self) -> bool:
        spent = getattr(self._click, "spent", None)
        if spent is None or spent < self.click_budget_seconds:
            return False
        if not self._click.over:
            self._click.over = True
            self._over_budget_at = time.monotonic()
            self._count(clicks_over_budget=1)
            logger.warning(
                "Redis at %s is slow: a click spent %.2f s in Redis calls, over REDIS_CLICK_BUDGET_SECONDS (%g s); "
                "it goes on without Redis", self.url, spent, self.click_budget_seconds
            )
        return True

    def _call(self, operation: Callable[[], Any], default: Any = None, budgeted: bool = True) -> Any:
        """operation() against Redis, or `default` when Redis is unavailable or fails (never raises), or when
        the click this thread serves has spent its Redis budget (unless `budgeted` is False: releasing a lock)."""
        if time.monotonic() < self._down_until or (budgeted and self._over_budget()):
            return default
        started = time.perf_counter()
        try:
            result = operation()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            self._spend(time.perf_counter() - started)
            self._count(errors=1, seconds=time.perf_counter() - started)
            self._down_until = time.monotonic() + self.retry_seconds
            if self._last_error is None:
                logger.warning(
                    "Redis at %s is unavailable (%s): serving from this process's caches alone, trying again in "
                    "%g s (REDIS_RETRY_SECONDS)", self.url, error, self.retry_seconds
                )
            self._last_error = f"{type(error).__name__}: {error}"
            return default
        except redis.RedisError as error:  # the server answered with an error (e.g. out of memory, noeviction)
            self._spend(time.perf_counter() - started)
            self._count(errors=1, seconds=time.perf_counter() - started)
            logger.warning("Redis at %s refused a command: %s", self.url, error)
            return default
        self._spend(time.perf_counter() - started)
        self._count(seconds=time.perf_counter() - started)
        if self._last_error is not None:
            logger.warning("Redis at %s is reachable again: sharing features and click states", self.url)
            self._last_error = None
        return result

    def _spend(self, seconds: float) -> None:
        if getattr(self._click, "spent", None) is not None:
            self._click.spent += seconds

    @property
    def available(self) -> bool:
        return self._last_error is None

    @property
    def slow(self) -> bool:
        """Whether a click went over its Redis budget within the last SLOW_REPORT_SECONDS."""
        at = self._over_budget_at
        return at is not None and time.monotonic() - at < SLOW_REPORT_SECONDS

    def check(self) -> bool:
        """Ping Redis (unless a recent failure says to wait): True when it answers."""
        return self._call(self._client.ping, default=False) is True

    def status(self) -> dict:
        """For /health and /metrics: pings Redis (unless a recent failure says to wait), so that it is current."""
        started = time.perf_counter()
        self.check()
        ping_seconds = time.perf_counter() - started
        with self._stats_lock:
            stats = dataclasses.asdict(self.stats)
        warnings = []
        if not self.available:
            warnings.append(f"Redis unavailable ({self._last_error}): clicks are served from this process's caches alone")
        elif self.slow:
            warnings.append(
                f"Redis slow: {stats['clicks_over_budget']} clicks so far spent over REDIS_CLICK_BUDGET_SECONDS "
                f"({self.click_budget_seconds:g} s) in Redis calls and went on without it, the last "
                f"{time.monotonic() - self._over_budget_at:.0f} s ago"
            )
        return {
            "configured": True,
            "url": self.url,
            "namespace": self.namespace,  # the loaded model files': keys are segnext:<namespace>:<kind>:<digest>
            "available": self.available,
            "error": self._last_error,
            "slow": self.slow,
            "ping_seconds": round(ping_seconds, 4),
            "click_budget_seconds": self.click_budget_seconds,
            "warnings": warnings,
            **stats,
        }

    # -- keys and values ----------------------------------------------------------------------------------

    def _key(self, kind: str, key: Any) -> str:
        return f"segnext:{self.namespace}:{kind}:{stable_digest(key)}"

    def _get(self, name: str) -> bytes | None:
        # GETEX: a read refreshes the entry's expiry, so what is in use stays.
        return self._call(lambda: self._client.getex(name, ex=self.ttl_seconds))

    def _set(self, name: str, value: bytes) -> bool:
        return bool(self._call(lambda: self._client.set(name, value, ex=self.ttl_seconds), default=False))

    def _unpack(self, value: bytes | None, magic: bytes, dtype: str, exact: Callable[[int, int], bool], shape: tuple):
        """(array, first, second) when `value` is exactly what this backend writes (see the module's
        docstring), else None."""
        if value is None:
            return None
        data = memoryview(value)[HEADER.size :]
        if len(value) >= HEADER.size:
            found, first, second = HEADER.unpack_from(value)
            if found == magic and exact(first, second) and len(data) == int(np.prod(shape)) * np.dtype(dtype).itemsize:
                array = np.frombuffer(data, dtype=dtype).reshape(shape)
                if np.isfinite(array).all():
                    return array, first, second
        self._count(foreign_values=1)
        logger.warning("ignoring a foreign value in Redis (%d bytes): a miss", len(value))
        return None

    # -- object states ------------------------------------------------------------------------------------

    def load_state(self, key: Any) -> np.ndarray | None:
        unpacked = self._unpack(
            self._get(self._key("state", key)), STATE_MAGIC, "<f4", lambda rows, cols: (rows, cols) == STATE_SHAPE, STATE_SHAPE
        )
        if unpacked is None:
            self._count(state_misses=1)
            return None
        self._count(state_hits=1)
        return unpacked[0].astype(np.float32)  # a writable copy, in native byte order

    def has_state(self, key: Any) -> bool:
        """Whether a state is stored (without reading its 4 MB): for counting what a replay would cost."""
        return bool(self._call(lambda: self._client.exists(self._key("state", key)), default=0))

    def store_state(self, key: Any, logits: np.ndarray) -> None:
        rows, cols = logits.shape
        value = HEADER.pack(STATE_MAGIC, rows, cols) + np.ascontiguousarray(logits, dtype="<f4").tobytes()
        if self._set(self._key("state", key), value):
            self._count(state_writes=1)

    def forget_state(self, key: Any) -> None:
        self._call(lambda: self._client.delete(self._key("state", key)))

    # -- features, encoded once across the fleet ----------------------------------------------------------

    def _load_features(self, name: str) -> tuple[np.ndarray, int, int] | None:
        return self._unpack(self._get(name), FEATURES_MAGIC, "<f2", lambda width, height: width >= 1 and height >= 1, FEATURE_SHAPE)

    def features(
        self, key: Any, compute: Callable[[], tuple[np.ndarray, int, int]]
    ) -> tuple[np.ndarray, int, int, bool]:
        """(features, width, height, from_redis): read from Redis, or `compute()`d here and written there.

        Computed features come back rounded to float16, as every other process will read them; when Redis is
        unavailable, or the features do not fit float16, they come back as computed and are not shared.
        """
        name, lock = self._key("features", key), self._key("encoding", key)
        token = uuid.uuid4().hex
        waited = False
        while True:
            stored = self._load_features(name)
            if stored is not None:
                self._count(feature_hits=1)
                return (*stored, True)
            if not self.available:
                break
            # SET NX answers None when another process holds the lock.
            acquired = self._call(lambda: self._client.set(lock, token, nx=True, px=self.lock_ms), default=_FAILED)
            if acquired is _FAILED:  # Redis failed or refused: encode here rather than wait on nothing
                break
            if acquired:
                self._count(feature_misses=1)
                with self._holding(lock, token):
                    features, width, height = compute()
                    half = np.asarray(features).astype(np.float16)
                    if not np.isfinite(half).all():  # beyond float16's range: this process keeps float32
                        return features, width, height, False
                    value = HEADER.pack(FEATURES_MAGIC, width, height) + half.astype("<f2").tobytes()
                    if self._set(name, value):
                        self._count(feature_writes=1)
                        return half, width, height, False
                    return features, width, height, False
            if not waited:
                self._count(encode_waits=1)
                waited = True
            if not self._wait_for_encode(name, lock):
                break
        features, width, height = compute()  # Redis failed meanwhile: this process encodes for itself
        return features, width, height, False

    def _wait_for_encode(self, name: str, lock: str) -> bool:
        """Wait while another process holds the lock and the features are not there; False if Redis fails,
        or when the holder has not written them within `encode_wait_seconds` (it may hang, renewing its lock:
        this process then encodes itself)."""
        deadline = time.monotonic() + self.encode_wait_seconds
        pause = self.poll_seconds
        while True:
            exists = self._call(lambda: self._client.pipeline(transaction=False).exists(name).exists(lock).execute())
            if exists is None:
                return False
            features_there, lock_held = exists
            if features_there or not lock_held:  # written, or released without them, or the holder died
                return True
            if time.monotonic() >= deadline:
                self._count(encode_wait_timeouts=1)
                logger.warning(
                    "another process has held the encode lock of an image for over %g s (REDIS_ENCODE_WAIT_SECONDS): "
                    "encoding it here", self.encode_wait_seconds
                )
                return False
            time.sleep(pause)
            # Polls count against the click's Redis budget: a long wait polls less often.
            pause = min(pause * 1.5, MAX_POLL_SECONDS)

    @contextmanager
    def _holding(self, lock: str, token: str):
        """Keep the encode lock while the block runs (renewed, so that only a dead holder's lock expires)."""
        done = threading.Event()

        def renew():
            while not done.wait(self.lock_ms / 3000):
                self._call(lambda: self._renew(keys=[lock], args=[token, self.lock_ms]))

        renewer = threading.Thread(target=renew, name="redis-lock-renew", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            self._call(lambda: self._release(keys=[lock], args=[token]), budgeted=False)
