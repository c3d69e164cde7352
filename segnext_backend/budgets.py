"""A budget of pixels shared by threads: how many image pixels may be decoded and held at once.

Decoding a large image costs several bytes per pixel for a moment (the decoder's own buffers, a mode
conversion) and three per pixel for the RGB array until the encoder has read it. One request at a time
is bounded by MAX_IMAGE_PIXELS; this bounds them together: a decode takes its pixels before it starts and
gives them back when its RGB array is freed, and waits while others hold the budget. Waiters are served in
arrival order, so a large image is not starved by a stream of small ones; an image larger than the whole
budget takes all of it (and so runs alone).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque


class PixelBudget:
    def __init__(self, pixels: int):
        self.capacity = max(1, pixels)
        self._available = self.capacity
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._changed:
            return self.capacity - self._available

    def acquire(self, pixels: int) -> int:
        """Wait for `pixels` (at most the whole budget) and take them; returns what was taken."""
        wanted = min(max(1, pixels), self.capacity)
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                self._changed.wait_for(lambda: self._waiting[0] is ticket and self._available >= wanted)
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()
            self._available -= wanted
        return wanted

    def release(self, taken: int) -> None:
        with self._changed:
            self._available += taken
            self._changed.notify_all()

    def release_when_freed(self, holder: object, taken: int) -> None:
        """Give `taken` back once `holder` (the decoded array) is garbage."""
        weakref.finalize(holder, self.release, taken)
