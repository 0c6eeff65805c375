"""Room for the updates paho's thread has received and the main thread has not handled yet.

At most `count` updates and `nbytes` bytes wait in memory; past either bound paho's thread waits, so it
reads no further from its socket and the rest stay at the broker (TCP backpressure), whose queue for the
aggregator's session is sized for the whole round (`broker.mosquitto.queue_limits`). An update larger
than `nbytes` still gets in when nothing else waits, so no valid update can block the queue for good.
"""

from __future__ import annotations

import threading


class Room:
    def __init__(self, count: int, nbytes: int) -> None:
        if count < 1 or nbytes < 1:
            raise ValueError(f"the queue needs room for at least 1 update and 1 byte, got {count}, {nbytes}")
        self.count, self.nbytes = count, nbytes
        self._held = 0
        self._held_bytes = 0
        self._cond = threading.Condition()

    def _fits(self, size: int) -> bool:
        return self._held == 0 or (self._held < self.count and self._held_bytes + size <= self.nbytes)

    def take(self, size: int, stop: threading.Event, poll_s: float = 0.5) -> bool:
        """Wait until an update of `size` bytes fits, then hold its place; False (nothing held) once `stop` is set."""
        with self._cond:
            while not self._fits(size):
                if stop.is_set():
                    return False
                self._cond.wait(poll_s)
            self._held += 1
            self._held_bytes += size
            return True

    def give(self, size: int) -> None:
        """Free the place an update of `size` bytes held."""
        with self._cond:
            self._held = max(0, self._held - 1)
            self._held_bytes = max(0, self._held_bytes - size)
            self._cond.notify_all()

    @property
    def held(self) -> int:
        return self._held

    @property
    def held_bytes(self) -> int:
        return self._held_bytes
