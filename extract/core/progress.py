"""Progress of long loops: a tqdm bar on a terminal, plain log lines (rate and ETA) elsewhere.

On a cluster or under ``nohup`` the output is a log file: a bar there is one endless line, so
:func:`progress_bar` then logs ``desc: 120/4143 (2.9%), 3.1/s, ETA 21:36`` at most every
``interval`` seconds instead. Both have tqdm's ``update`` / ``set_postfix`` / ``close``.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class LogProgress:
    """tqdm-like progress that writes log lines (no terminal control characters)."""

    def __init__(self, total: int, desc: str, unit: str = "video", interval: float = 30.0):
        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, float(interval)
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if now - self._last >= self.interval or self.n >= self.total:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self._start)
        rate = self.n / elapsed
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(left))
        pct = 100.0 * self.n / self.total if self.total else 100.0
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.1f}%), {rate:.2f}/s, ETA {eta}{extra}"

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = False, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "video", stream=None):
    """A tqdm bar when ``enabled`` and ``stream`` (default stderr) is a terminal; log lines when
    enabled elsewhere; nothing when disabled."""
    if not enabled:
        return _Silent()
    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        return LogProgress(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=1.0, desc=desc, file=stream)
