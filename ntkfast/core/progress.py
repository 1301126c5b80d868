"""Progress bars for ntkfast's long loops (tqdm), and the rule that decides when one shows.

Every ``progress=`` option of ntkfast takes None (the default), True or False:

- ``None`` (auto): on a terminal the bar shows from the start; elsewhere (a log file, CI, a
  notebook) only once the work has run :data:`AUTO_DELAY` seconds, so a short call prints nothing.
- ``True``: the bar shows from the start, wherever stderr goes.
- ``False``: no bar, nor any bar of the work it runs (the scorer's NTK blocks, say).

``TQDM_DISABLE=1`` in the environment silences every bar whatever the option, read each time a
bar is made. A bar opened while another ntkfast bar is open (a training's steps inside its
epochs, a study cell's pruning) is an inner bar: it shows only once its own work has run
:data:`AUTO_DELAY` seconds and is cleared when done, so the outer bar stays readable.

    with progress_bar(10, "train", progress=None) as bar:
        for epoch in range(10):
            ...
            bar.update(1, loss=0.123, acc=0.97)

Outside a terminal or notebook a bar redraws at most every :data:`LOG_INTERVAL` seconds, and every
bar sits on one line (a log has no cursor to move between lines).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Optional

__all__ = ["AUTO_DELAY", "LOG_INTERVAL", "check_progress", "env_disabled", "progress_bar", "Bar",
           "BarSafeHandler", "format_value"]

AUTO_DELAY = 2.0
"""Seconds of work before an auto (or inner) bar appears."""

LOG_INTERVAL = 10.0
"""Least seconds between two redraws of a bar written to a log (not a terminal or notebook)."""

# per thread: the open ntkfast bars, innermost last. An inner bar inherits the silence of the
# one around it (prune(progress=False) also silences the NTK it computes), and closing a bar
# closes any inner bar an exception left open.
_open = threading.local()


def _stack() -> list:
    if not hasattr(_open, "bars"):
        _open.bars = []
    return _open.bars


def format_value(value) -> str:
    """Short text for one field: floats with 4 significant digits, everything else via str()."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def check_progress(value, name: str = "progress") -> Optional[bool]:
    """``value`` if it is None, True or False; a TypeError naming ``name`` otherwise."""
    if value is None or isinstance(value, bool):
        return value
    raise TypeError(f"{name}: expected None (auto), True or False, got {value!r}")


def env_disabled() -> bool:
    """Whether ``TQDM_DISABLE`` asks for no bars (any value but "", "0", "false", "no", "off")."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _tqdm_class():
    # imported here: a bar is made once per call of the long functions, and ``import ntkfast``
    # stays free of it
    from tqdm.auto import tqdm

    return tqdm


def _in_notebook() -> bool:
    import tqdm.autonotebook
    import tqdm.std

    return tqdm.autonotebook.tqdm is not tqdm.std.tqdm


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Bar:
    """One progress bar: ``update(n, **fields)`` advances it by ``n`` steps and shows the fields
    after the rate and ETA; ``close()`` (or leaving a ``with`` block) ends it. A silenced bar
    does nothing. Made by :func:`progress_bar`."""

    def __init__(self, tqdm_bar, silenced: bool):
        self._bar = tqdm_bar
        self.silenced = silenced
        self._closed = False
        self._fields: dict = {}

    def update(self, n: int = 1, **fields) -> None:
        """Advance by ``n`` steps (0 to only change fields); a field keeps its last value until
        given again."""
        if self._closed:
            return
        if fields:
            self._fields.update(fields)
            # no refresh here: a refresh would draw a bar still inside its delay
            self._bar.set_postfix({k: format_value(v) for k, v in self._fields.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        """End the bar, and any inner bar still open."""
        if self._closed:
            return
        stack = _stack()
        if self not in stack:  # closed from another thread than the one that opened it
            self._finish()
            return
        while True:
            inner = stack.pop()
            inner._finish()
            if inner is self:
                return

    def _finish(self) -> None:
        self._closed = True
        self._bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: Optional[int], desc: str, *, progress: Optional[bool] = None, active: bool = True,
                 inner: bool = False, unit: str = "it", initial: int = 0) -> Bar:
    """A :class:`Bar` of ``total`` steps (None: unknown) labelled ``desc``, shown as ``progress``
    asks (see the module's notes). ``active=False`` silences it (a process other than rank 0);
    ``inner=True`` makes it an inner bar even when no ntkfast bar is open (work that runs often
    inside a user's loop, such as the empirical NTK's blocks). Close it (or use ``with``)."""
    progress = check_progress(progress)
    stack = _stack()
    nested = bool(stack) or inner
    silenced = progress is False or not active or env_disabled() or (bool(stack) and stack[-1].silenced)
    stream = sys.stderr
    terminal = _is_terminal(stream)
    notebook = _in_notebook()
    shows_at_once = progress is True or (progress is None and terminal)
    options = dict(
        total=total, desc=desc, unit=unit, initial=initial, file=stream, disable=silenced,
        delay=0.0 if shows_at_once and not nested else AUTO_DELAY,
        leave=not nested, dynamic_ncols=terminal,
        mininterval=0.1 if terminal or notebook else LOG_INTERVAL,
    )
    if not (terminal or notebook):
        options["position"] = 0  # in a log, a cursor movement between lines is only noise
    bar = Bar(_tqdm_class()(**options), silenced)
    stack.append(bar)
    return bar


class BarSafeHandler(logging.Handler):
    """A logging handler that prints each message on its own line of stderr, above any progress
    bar rather than through it (the CLI installs one on the "ntkfast" logger)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # stderr looked up now: it may have been replaced since the handler was made
            _tqdm_class().write(self.format(record), file=sys.stderr)
        except Exception:  # logging's convention: a failing handler reports, never raises
            self.handleError(record)
