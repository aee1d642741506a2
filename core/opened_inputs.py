"""Inputs opened once per command.

A fit can look at its INPUT several times before it reads it: the keys for
``--groups utterance``, the sequence ends for ``--batch-boundaries
sequences``, the row shape a ``--mean`` file is checked against, and the fit
itself. Opening an scp of 100 000 utterances, an HDF5 group of as many
datasets or an ``s3://`` URL costs seconds each time. Within
:func:`opened_once`, :func:`normstats.stream.open_stream` gives the same
:class:`~normstats.stream.Stream` for the same shards: its sources hold
only their index between uses (leaving a ``with`` closes their file
handles, and the next read opens them again, checking that the file is the
one indexed).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Callable, Iterator, Optional

_OPENED: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("normstats_opened", default=None)


@contextlib.contextmanager
def opened_once() -> Iterator[None]:
    """Within it (a ``with`` block or a decorated function), each set of shards is opened once."""
    token = _OPENED.set({"pid": os.getpid()})
    try:
        yield
    finally:
        for key, stream in _OPENED.get().items():
            if key != "pid":
                stream.close()
        _OPENED.reset(token)


def reused(key: tuple, opening: Callable[[], Any]) -> Any:
    """What `opening()` returns, from an earlier call with the same `key` within :func:`opened_once`."""
    opened = _OPENED.get()
    if opened is None or opened["pid"] != os.getpid():  # a forked worker opens its own
        return opening()
    if key not in opened:
        opened[key] = opening()
    return opened[key]
