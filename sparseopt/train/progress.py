"""A progress bar (tqdm when installed and writing to a terminal; silent otherwise): training epochs and long analyses."""

from __future__ import annotations

import sys


class Progress:
    """``lines``: when the output is not a terminal (a log file, CI), print a line at every tenth of the total
    instead of staying silent (long analyses; training prints its own line per epoch)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, lines: bool = False):
        self.bar = None
        self.desc, self.total, self.lines = desc, total, enabled and lines and not sys.stderr.isatty()
        self.printed = 0  # tenths already printed
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
            except ImportError:
                pass
        self.last = 0

    def update(self, done: int, *, loss: float | None = None, acc: float | None = None, ips: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(done - self.last)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}%", img_s=f"{ips:.0f}", refresh=False)
        elif self.lines and self.total and 10 * done // self.total > self.printed:
            self.printed = 10 * done // self.total
            print(f"{self.desc}: {done}/{self.total} ({100 * done // self.total}%)", flush=True)
        self.last = done

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
