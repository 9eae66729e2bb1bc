"""A circuit breaker per arm: stop sending to an arm that fails, and try it again after a cool-down.

States (the *circuit* of an arm):

- ``closed``: requests flow. ``failure_threshold`` consecutive failed requests, or one failed active
  probe, open it. (A probe failing means the arm does not answer at all, e.g. the Mac is asleep: waiting
  for several requests to time out would cost each of them the timeout.)
- ``open``: nothing is sent. After ``cooldown_s`` it becomes half-open.
- ``half_open``: exactly one trial, a request or a probe, whichever claims it first (``try_acquire``).
  Its success closes the circuit; its failure opens it for another ``cooldown_s``.

When every arm's circuit is open the router does not send to a dead arm anyway: it answers 503 with
``Retry-After`` (the time until the first arm goes half-open; see ``policy.NoArm``). LiteLLM's opposite
trap, never cooling down a lone deployment, makes every request during an outage pay the failed attempts.

The clock is injectable (``clock=``, seconds, monotonic) so tests drive time by hand. Not thread-safe:
the router calls it from its one event loop.
"""

from __future__ import annotations

import time
from typing import Callable, Literal

CircuitState = Literal["closed", "open", "half_open"]


class Breaker:
    """The circuit of one arm. Record every outcome; ask ``try_acquire()`` before sending."""

    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1 or cooldown_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_s > 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state: CircuitState = "closed"
        self._failures = 0          # consecutive failed requests while closed
        self._opened_at = 0.0
        self._trial = False         # half-open: the one trial is out
        self.opened_count = 0       # times the circuit opened (a metric)

    # -- reading ----------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The state now (an open circuit whose cool-down has passed reads as half-open)."""
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._state, self._trial = "half_open", False
        return self._state

    def admits(self) -> bool:
        """Whether a request could be sent now: closed, or half-open with its trial not taken. Changes nothing."""
        s = self.state
        return s == "closed" or (s == "half_open" and not self._trial)

    def retry_after(self) -> float:
        """Seconds until this arm may be tried again: 0 unless open."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    # -- sending ----------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Claim the right to send one request or probe. Closed: always. Half-open: the first caller
        gets the trial, the others are refused until it reports. Open: refused."""
        s = self.state
        if s == "closed":
            return True
        if s == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def release(self) -> None:
        """The claimed trial ended with no verdict (the client went away first): free it for another."""
        if self._state == "half_open":
            self._trial = False

    # -- outcomes ---------------------------------------------------------------------------

    def record_success(self) -> None:
        """A request succeeded (its first byte came): closes a half-open circuit, resets the failure count."""
        if self.state == "open":
            return  # a request sent before the circuit opened: no verdict on the arm now
        self._state, self._failures, self._trial = "closed", 0, False

    def record_failure(self) -> None:
        """A request failed before its first byte (refused, timed out, 5xx, 429, no first token in time)."""
        s = self.state
        if s == "half_open":
            self._open()
        elif s == "closed":
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()

    def record_probe(self, ok: bool) -> None:
        """An active health probe's result. A failed probe opens a closed circuit at once; a half-open
        circuit takes the probe as its trial (claim it with ``try_acquire`` first). An open circuit
        ignores probes until its cool-down ends."""
        s = self.state
        if s == "open":
            return
        if s == "half_open":
            if ok:
                self._state, self._failures, self._trial = "closed", 0, False
            else:
                self._open()
        elif not ok:
            self._open()

    def _open(self) -> None:
        self._state, self._opened_at, self._trial, self._failures = "open", self._clock(), False, 0
        self.opened_count += 1
