"""A tiny progress printer for long loops (training epochs, pruning rounds).

No dependencies. Writes to stderr (or a given stream). On a terminal it redraws one line with a
carriage return; elsewhere (logs, pipes, CI) it prints one line per update so nothing is lost.

    bar = Progress(total=10, desc="train")
    for epoch in range(10):
        ...
        bar.update(loss=0.123, acc=0.97)
    bar.close()

``Progress`` is also a context manager (``with Progress(...) as bar:``), closing itself on exit.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress", "format_value"]


def format_value(value) -> str:
    """Short text for one field: floats with 4 significant digits, everything else via str()."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Count steps towards ``total`` and show ``desc [done/total] field=value ... elapsed``.

    Args:
        total: the number of steps expected (None: unknown, only the count is shown).
        desc: a label at the start of the line.
        enabled: False makes every method a no-op (for ``progress=False`` options).
        stream: where to write; default ``sys.stderr`` (looked up when the object is made).
        min_interval: on a terminal, the least number of seconds between two redraws (the last
            step is always drawn). Ignored when the stream is not a terminal.
    """

    def __init__(
        self,
        total: Optional[int] = None,
        desc: str = "",
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        min_interval: float = 0.1,
    ):
        self.total = total
        self.desc = desc
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = float(min_interval)
        self.count = 0
        self.fields: dict = {}
        self._start = time.perf_counter()
        self._last_draw = float("-inf")
        self._line_len = 0
        self._dirty = False  # a tty line is on screen without its final newline
        self._closed = False
        try:
            self._tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self._tty = False

    # -- public ----------------------------------------------------------------------------------
    def update(self, n: int = 1, **fields) -> None:
        """Advance by ``n`` steps (0 to only change fields) and show the given fields."""
        if not self.enabled or self._closed:
            return
        self.count += n
        self.fields.update(fields)
        now = time.perf_counter()
        finished = self.total is not None and self.count >= self.total
        if self._tty and not finished and now - self._last_draw < self.min_interval:
            return
        if not self._tty and not finished and self.total:
            # a log gets about 20 lines however long the loop (100 pruning rounds, say)
            step = max(1, self.total // 20)
            if self.count // step == (self.count - n) // step and self.count > n:
                return  # no multiple of step crossed (updates may advance by more than one)
        self._last_draw = now
        self._draw(self.line())

    def write(self, message: str) -> None:
        """Print a message on its own line without breaking the progress line."""
        if not self.enabled:
            return
        if self._tty and self._dirty:
            self.stream.write("\r" + " " * self._line_len + "\r")
            self._dirty = False
            self._line_len = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Finish the line (on a terminal) and stop printing."""
        if self._closed:
            return
        self._closed = True
        if self.enabled and self._tty and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False

    def line(self) -> str:
        """The current progress text (without newline)."""
        parts = []
        if self.desc:
            parts.append(self.desc)
        parts.append(f"[{self.count}/{self.total}]" if self.total is not None else f"[{self.count}]")
        parts.extend(f"{k}={format_value(v)}" for k, v in self.fields.items())
        parts.append(_format_seconds(time.perf_counter() - self._start))
        return " ".join(parts)

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _draw(self, text: str) -> None:
        if self._tty:
            pad = max(self._line_len - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self._line_len = len(text)
            self._dirty = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
