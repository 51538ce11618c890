"""A small progress bar (no dependency): one line redrawn with a carriage return on a terminal,
a line every tenth of the way otherwise (logs, CI, pytest)."""
from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str = "", width: int = 24, stream=None):
        self.total, self.desc, self.width = max(int(total), 1), desc, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.n, self.start, self.postfix = 0, time.perf_counter(), ""
        self._last_tenth = -1

    def line(self) -> str:
        frac = self.n / self.total
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.n * (self.total - self.n) if self.n else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        return (f"{self.desc} |{bar}| {self.n}/{self.total} "
                f"[{_fmt_time(elapsed)}<{_fmt_time(eta)}]" + (f" {self.postfix}" if self.postfix else ""))

    def update(self, steps: int = 1, /, **postfix) -> None:
        self.n = min(self.n + steps, self.total)
        if postfix:
            self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in postfix.items())
        if self.tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        else:
            tenth = self.n * 10 // self.total
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
