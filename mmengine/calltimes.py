"""How long a model's calls take, as one process has seen them.

A worker judges by them whether a queued request would miss its deadline
(and skips it); the front-end judges the same of a request waiting for its
turn (and drops it unsent), and sizes a worker's backlog by them
(Config.worker_backlog_ms). One rule for both, kept here.
"""
from __future__ import annotations

from typing import Hashable

# A model's recent call time, not renewed by a call for this long, counts
# half as much in judging whether a queued request would miss its deadline
# (CallTimes.would_miss): a figure gone stale gives way.
MISS_TRUST_HALF_LIFE_S = 1.0


class CallTimes:
    """Per model: a figure near the fastest of its recent calls, which a
    request must have the time for; the mean of its recent calls, what a
    call is expected to take; and when a call last renewed them (seconds
    of time.monotonic())."""

    def __init__(self) -> None:
        # key -> [fast, mean, renewed]; fast and mean 0 until a call after
        # the first.
        self._calls: dict[Hashable, list[float]] = {}

    def ran(self, key: Hashable, seconds: float, now: float) -> None:
        """Notes that a call of `key` took `seconds`, ending at `now`. Its
        first call is not counted: that is the warm-up, which may take many
        times the others. Then a faster call is taken at once into the fast
        figure, a slower one moves it an eighth of the way (one slow call, a
        preemption, does not make the model look slow); the mean moves a
        quarter of the way either way (one fast call, an input refused at
        once, does not make it look fast)."""
        call = self._calls.get(key)
        if call is None:
            self._calls[key] = [0.0, 0.0, now]
        elif not call[0]:
            call[:] = [seconds, seconds, now]
        else:
            fast, mean = call[0], call[1]
            call[0] = seconds if seconds < fast else fast + (seconds - fast) / 8
            call[1] = mean + (seconds - mean) / 4
            call[2] = now

    def would_miss(self, key: Hashable, deadline: float, now: float) -> bool:
        """Whether a call of `key` begun at `now` would end past `deadline`:
        surely past it; else by the fast figure, trusted less as it ages
        without a call to renew it (a model's calls are not all alike, and
        one judged by a stale figure would never run to renew it)."""
        if now >= deadline:
            return True
        call = self._calls.get(key)
        if call is None:
            return False
        return deadline - now < call[0] * 0.5 ** ((now - call[2]) / MISS_TRUST_HALF_LIFE_S)

    def expected(self, key: Hashable) -> float | None:
        """What a call of `key` is expected to take (its recent mean), or
        None before a call after the first."""
        call = self._calls.get(key)
        return call[1] if call is not None and call[0] else None

    def forget(self, key: Hashable) -> None:
        self._calls.pop(key, None)

    def clear(self) -> None:
        self._calls.clear()
