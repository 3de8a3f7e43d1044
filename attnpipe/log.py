"""Logging for the whole package: one ``attnpipe`` logger, configured in one place, and a progress helper.

Library modules log through ``logging.getLogger(__name__)`` (children of ``attnpipe``) and never configure
handlers; the CLI calls :func:`configure` once with its ``-v``/``-q`` count. A library user who never calls it gets
Python's defaults (warnings and errors on stderr), so importing attnpipe prints nothing.

Example::

    from attnpipe import log
    log.configure(verbosity=1)                       # -v: debug lines too
    for part in log.progress(parts, "index: adding parts", unit="part"):
        ...                                          # "index: adding parts 3/8 (37%) 1.2 part/s, ETA 4 s"
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
ROOT = "attnpipe"
_FORMAT = "%(message)s"
_handler: logging.Handler | None = None


def get_logger(name: str = ROOT) -> logging.Logger:
    """The package logger, or one of its children (pass ``__name__``)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def configure(verbosity: int = 0, stream=None) -> logging.Logger:
    """Send ``attnpipe`` log lines to ``stream`` (default: the current ``sys.stderr``) at a level from ``verbosity``.

    ``verbosity``: ``-1`` or less (``-q``) warnings only, ``0`` info, ``1`` or more (``-v``) debug. Calling it again
    replaces the handler (so tests that capture stderr see the lines), never adds a second one.
    """
    global _handler
    logger = logging.getLogger(ROOT)
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbosity > 0 else _FORMAT))
    logger.addHandler(_handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per message, even when the application configured the root logger
    return logger


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "it",
    logger: logging.Logger | None = None,
    every: float = 5.0,
) -> Iterator[T]:
    """Yield ``items`` and log ``desc done/total (pct) rate, ETA`` at most every ``every`` seconds and at the end.

    A logging-based bar: it works the same in a terminal, under ``ray job submit`` and in a log file, where a
    carriage-return bar would not. ``total`` defaults to ``len(items)`` when it has one.
    """
    logger = logger or get_logger()
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every or (total is not None and done == total):
            last = now
            logger.info("%s", progress_line(desc, done, total, now - start, unit))


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "it") -> str:
    """``desc 3/8 (37%) 1.2 part/s, ETA 4 s`` (no total: ``desc 3 part, 1.2 part/s``)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if total is None:
        return f"{desc} {done} {unit}, {rate:.3g} {unit}/s"
    line = f"{desc} {done}/{total} ({100 * done // max(total, 1)}%) {rate:.3g} {unit}/s"
    if done < total and rate > 0:
        line += f", ETA {_duration((total - done) / rate)}"
    elif done >= total:
        line += f", {_duration(elapsed)}"
    return line


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 90:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 5400 else f"{s // 3600} h {s % 3600 // 60} min"
