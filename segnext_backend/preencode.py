"""Encoding the images of opened tasks in the background, within bounds.

Opening a task sends a request without clicks; the first click will need the image's features and the
encoder is slow, so the image is fetched and encoded meanwhile. That work is bounded: one thread, at most
`queue_length` images waiting (when full, the oldest waiting one is dropped: the tasks opened last are the
ones about to be clicked), an image already waiting is not queued twice, and `stop()` (SIGTERM, shutdown)
drops what waits and cuts the download in progress short, so a stopping process fetches nothing more.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Hashable

logger = logging.getLogger(__name__)


class PreEncoder:
    def __init__(self, work: Callable[[Hashable], None], queue_length: int, abort_running: Callable[[threading.Thread], None]):
        """`work(item)` fetches and encodes one image; `abort_running(thread)` ends that thread's download."""
        self._work = work
        self._abort_running = abort_running
        self.queue_length = queue_length
        self._waiting: OrderedDict[Hashable, None] = OrderedDict()
        self._changed = threading.Condition()
        self._stopped = False
        self._busy = False
        self.dropped = 0
        # A daemon: a process that ends (`_wsgi.py --check`, the development server) does not wait for it;
        # under gunicorn, SIGTERM stops it first (gunicorn.conf.py).
        self._thread = threading.Thread(target=self._run, name="pre-encode", daemon=True)
        self._thread.start()

    def submit(self, item: Hashable) -> None:
        with self._changed:
            if self._stopped or item in self._waiting or self.queue_length == 0:
                return
            self._waiting[item] = None
            while len(self._waiting) > self.queue_length:
                dropped, _ = self._waiting.popitem(last=False)
                self.dropped += 1
                logger.info("pre-encode queue full (PREENCODE_QUEUE_LENGTH=%d): not pre-encoding %s", self.queue_length, dropped)
            self._changed.notify_all()

    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._waiting.clear()
            self._changed.notify_all()
        self._abort_running(self._thread)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits or runs (for tests and benchmarks)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._waiting and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopped or self._waiting)
                if self._stopped:
                    return
                item, _ = self._waiting.popitem(last=False)
                self._busy = True
            try:
                self._work(item)
            except Exception as error:  # the click that follows will report it to the user
                logger.warning("background encode of %s failed: %s", item, error)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
