"""A dependency-free progress bar on stderr (one line, rewritten in place)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total, desc)``; ``update(n, postfix)`` redraws ``desc [###...] n/total elapsed, left``."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = int(total), desc, enabled
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = time.perf_counter() if enabled else 0.0
        self.postfix = ""

    def update(self, n: int = 1, postfix: str = "") -> None:
        if not self.enabled:
            return
        self.n += n
        self.postfix = postfix or self.postfix
        if self.enabled:
            el = time.perf_counter() - self.t0
            eta = el / self.n * (self.total - self.n) if self.n else 0.0
            width = 24
            fill = int(width * self.n / max(self.total, 1))
            self.stream.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} "
                              f"{el:5.1f}s elapsed, {eta:5.1f}s left {self.postfix}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
