"""Where a long run is: phases (scoring, randomisation check, permutation, metrics, render) report the work
they have done at their batch boundaries to a process-wide sink, which the command line draws as a progress
bar per phase with an ETA. No sink (the default, and on remote workers): reporting costs nothing."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

# sink(phase, advance, total): `advance` units done since the last call; `total` set (or grown) when not None;
# a note (what a phase is about to cost) comes as sink(phase, 0, None, note=text)
Sink = Callable[..., None]
_sink: Sink | None = None
_lock = threading.Lock()


@contextmanager
def reporting_to(sink: Sink | None) -> Iterator[None]:
    """Send progress to `sink` for the duration of the block."""
    global _sink
    before, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = before


def start(phase: str, total: int) -> None:
    """Announce `total` more units of work in `phase` (several shard tasks may add to one phase)."""
    if _sink is not None:
        with _lock:
            _sink(phase, 0, total)


def advance(phase: str, n: int = 1) -> None:
    """Record `n` units of `phase` done."""
    if _sink is not None and n:
        with _lock:
            _sink(phase, n, None)


@contextmanager
def step(phase: str) -> Iterator[None]:
    """A phase of one unit (metrics, render): shown while it runs, done when the block ends."""
    start(phase, 1)
    yield
    advance(phase)


def note(phase: str, text: str) -> None:
    """Tell the user something about `phase` before it runs (its size, its estimated cost)."""
    if _sink is not None:
        with _lock:
            _sink(phase, 0, None, note=text)
