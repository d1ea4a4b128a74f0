"""Progress lines for long transfers, written for pod logs rather than terminals.

A progress bar redraws one line with carriage returns; `kubectl logs` shows each redraw as
a line of its own, or nothing until the transfer ends. A transfer instead logs one plain
line every few seconds: bytes done and the rate, for the whole transfer and for each file
in flight. Several threads report into one `TransferProgress`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

KB = 1_000
MB = 1_000_000
GB = 1_000_000_000


def human_bytes(count: int) -> str:
    """`812 B`, `40.2 kB`, `512.0 MB`, `4.81 GB` (decimal units, as rates are counted)."""
    if count < KB:
        return f"{count} B"
    if count < MB:
        return f"{count / KB:.1f} kB"
    return f"{count / MB:.1f} MB" if count < GB else f"{count / GB:.2f} GB"


def rate(count: int, seconds: float) -> str:
    """`123.4 MB/s`."""
    return f"{count / MB / seconds:.1f} MB/s" if seconds > 0 else "- MB/s"


@dataclass
class _File:
    size: int
    done: int
    downloaded: int
    started: float


class TransferProgress:
    """Bytes done out of `total`, logged at most every `interval_s` seconds.

    Args:
        total: bytes of the whole transfer.
        log: where lines go.
        interval_s: seconds between lines.
        clock: a monotonic clock (seconds).
    """

    def __init__(
        self,
        total: int,
        log: Callable[[str], None],
        *,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self._log = log
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._last = self._started
        self._done = 0
        self._downloaded = 0
        self._files: dict[str, _File] = {}

    def skip(self, size: int) -> None:
        """A file already complete: counted as done, not as downloaded."""
        with self._lock:
            self._done += size

    def begin(self, name: str, size: int, have: int) -> None:
        """A file starts, `have` bytes of it already on disk."""
        with self._lock:
            self._done += have
            self._files[name] = _File(size, have, 0, self._clock())

    def restart(self, name: str) -> None:
        """A file starts again from byte 0 (what it had is discarded)."""
        with self._lock:
            file = self._files[name]
            self._done -= file.done
            file.done = 0

    def add(self, name: str, count: int) -> None:
        """`count` more bytes of a file were downloaded; logs a line when one is due."""
        with self._lock:
            file = self._files[name]
            file.done += count
            file.downloaded += count
            self._done += count
            self._downloaded += count
            now = self._clock()
            if now - self._last < self._interval:
                return
            self._last = now
            line = self.line(now)
        self._log(line)

    def end(self, name: str) -> None:
        """A file is finished (or failed)."""
        with self._lock:
            self._files.pop(name, None)

    def line(self, now: float) -> str:
        """The progress line at `now` (call with the lock held, or from one thread)."""
        elapsed = now - self._started
        percent = 100 * self._done / self.total if self.total else 100.0
        parts = [
            f"Progress: {human_bytes(self._done)} of {human_bytes(self.total)} "
            f"({percent:.0f}%) at {rate(self._downloaded, elapsed)}{self._eta(elapsed)}"
        ]
        for name, file in sorted(self._files.items()):
            share = 100 * file.done / file.size if file.size else 100.0
            parts.append(
                f"{name} {human_bytes(file.done)} of {human_bytes(file.size)} ({share:.0f}%) "
                f"at {rate(file.downloaded, now - file.started)}"
            )
        return "; ".join(parts)

    def _eta(self, elapsed: float) -> str:
        if self._downloaded <= 0 or elapsed <= 0:
            return ""
        left = (self.total - self._done) / (self._downloaded / elapsed)
        return f", about {left:.0f} s left"
