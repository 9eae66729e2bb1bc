"""Per row and per step: how many tokens to draft (K), or none, from what was measured here.

Two measurements:

* **acceptance per row**: every verify of a row's draft is a run of Bernoulli trials (each drafted
  token accepted or not, stopping at the first rejection). Their counts decay by ``ROW_DECAY`` a
  verify, so the estimate follows a row whose content changes (a copied block ends, free text
  starts): alpha = (accepted + 0.5) / (accepted + rejected + 1). A draft of k tokens is expected to
  add ``hit * sum(alpha ** i for i in 1..k)`` tokens, ``hit`` the share of asks that found a draft
  at all (n-gram lookups find none in free text).
* **the cost of a step on this device**, ``c(n, sync)``, the wall time between two steps' results, ``n``
  the query tokens of the forward (one a decoding row, k + 1 a row verifying k drafted tokens) and
  ``sync`` whether it was built after the host read the previous step (a speculating step is: its
  drafts need the previous tokens; a plain step is built on the previous step's lazy tokens and
  overlaps it): the line ``a + b n`` timed at start (``calibrate``), times a factor per regime
  measured on the running loop (:class:`CostModel`).
* **the cost of drafting** (:class:`DraftCost`): a draft model runs one forward per drafted depth (the
  j-th drafted token of every row asking for j or more, in one forward), each ``a' + b' w`` for ``w``
  rows, timed at start and scaled by what ``propose`` measures live; a proposer without a model
  (n-gram) costs its host time per row asked. The proposer's time is kept out of the step samples
  above, so neither is counted twice. Without it a draft as slow as the target (a 4-bit copy of
  the target on a CPU, where a forward's fixed costs dominate) looks free, and is drafted where it
  loses.

``plan`` ranks every (row, i-th drafted token) by its expected tokens and takes the prefix of that
ranking that maximizes the batch's expected tokens per second,
``(B + gain) / (c(B + drafted, sync) + drafting)``,
against not speculating at all. So a larger batch (where a step's cost grows with its tokens) turns
speculation off, and a row whose drafts stop being accepted drops out first. A row the plan leaves
out is probed now and then (K = 1; every row left out in the same step, so a probe costs one synced
step however many rows it re-measures; the interval doubles while probes find nothing accepted)
so its estimate can recover, but only where a row drafting well (``PROBE_ALPHA``) would pay at the
batch's size: under load a probe could not change the plan, and its synced step would be pure cost.

The plan is checked against what it delivers: every planned verify step's tokens per second, read back, over
what the model promised for it, an EWMA per batch size (``efficiency``; over all sizes where a size has too
few). The model's promise is scaled by it, so where the step costs, acceptance and drafting add up to more
than such steps then deliver (at 16 rows here: 0.7 of the promise), speculation turns itself off there.

With ``auto`` off every row that may drafts K tokens every step (vLLM's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

ROW_DECAY = 0.8  # weight of a row's earlier verifies at each new one (a memory of about 5)
HIT_DECAY = 0.8  # weight of earlier asks in a row's share of asks that found a draft
COST_ALPHA = 0.1  # EWMA weight of a step's measured cost (over the calibrated shape, and at its own n)
BUCKET_MIN = 3  # steps measured at one (n, sync) before their mean replaces the scaled line there
# Speculation must promise this much more throughput than not speculating. Not 1.0: the rows a plan picks are
# those whose recent acceptance is highest, which overstates their next (the winner's curse), and a plan
# promising a few percent under load (16 rows, bench/speculative.py) measured as a wash or a small loss.
MARGIN = 1.08
PROBE_FIRST, PROBE_MAX = 8, 256  # steps between probes of a row left out, doubling while probes fail
PROBE_ALPHA = 0.9  # the acceptance a probe hopes for: a row left out is probed only if such a row would pay


@dataclass
class RowStats:
    accepted: float = 0.0
    rejected: float = 0.0
    hits: float = 1.0  # decayed asks that found a draft (prior: one that did)
    asks: float = 1.0
    verifies: int = 0

    @property
    def alpha(self) -> float:
        return (self.accepted + 0.5) / (self.accepted + self.rejected + 1.0)

    @property
    def hit(self) -> float:
        return self.hits / self.asks


class CostModel:
    """``c(n, sync)``: measured where it was measured, else ``(a + b n) * ratio[sync]``.

    ``a + b n`` is one forward of n query tokens, built and run back to back (what ``calibrate`` times at
    start). What a step costs in the running loop differs from it by a factor per regime, an EWMA over
    the steps: a plain step overlaps building its graph with the previous step's compute (a factor
    below 1), a synced one does not; both carry the loop's own work per step. Where steps of this n
    and regime were measured (``BUCKET_MIN`` of them), their own EWMA is the cost: that corrects the
    line's shape where it matters, at the batch sizes this server runs. (A free fit of a, b and a
    sync term is not robust: a single stream gives samples at one n only, which leave b unknown.)"""

    def __init__(self, a: float = 0.02, b: float = 0.002):
        self.a, self.b = a, b
        self.ratio = {False: 1.0, True: 1.0}
        self.samples = {False: 0, True: 0}
        self.seen: dict[tuple[bool, int], list] = {}  # (sync, n) -> [EWMA seconds, samples]

    def predict(self, n: int, sync: bool) -> float:
        got = self.seen.get((sync, n))
        if got is not None and got[1] >= BUCKET_MIN:
            return got[0]
        return (self.a + self.b * n) * self.ratio[sync]

    def observe(self, n: int, sync: bool, seconds: float) -> None:
        r = min(2.0, max(0.5, seconds / (self.a + self.b * n)))  # one odd step (a GC, a page fault) moves it little
        k = self.samples[sync] = self.samples[sync] + 1
        self.ratio[sync] += max(COST_ALPHA, 1.0 / k) * (r - self.ratio[sync])
        got = self.seen.setdefault((sync, n), [seconds, 0])
        if got[1] >= BUCKET_MIN:
            seconds = min(2.0 * got[0], max(0.5 * got[0], seconds))
        got[1] += 1
        got[0] += max(COST_ALPHA, 1.0 / got[1]) * (seconds - got[0])


class DraftCost:
    """What a ``propose`` costs: ``ratio * sum(a + b w for each forward of w rows) + host * rows asked``.

    ``a + b w`` is one forward of the draft model over ``w`` one-token rows, timed at start (``calibrate``);
    ``ratio`` an EWMA of what ``propose`` calls take against that line (the catch-up tokens, the argmax and
    the read-back ride on it). A proposer that runs no forward (n-gram) has ``a = b = 0`` and only its host
    time per row, also an EWMA of what its calls take."""

    def __init__(self, a: float = 0.0, b: float = 0.0):
        self.a, self.b = a, b
        self.ratio, self.host = 1.0, 0.0
        self.samples = 0

    def forward(self, w: int) -> float:
        """One draft forward of ``w`` rows."""
        return (self.a + self.b * w) * self.ratio if w else 0.0

    def catchup(self, n: int) -> float:
        """What ``n`` positions a row catches up on add to the first forward."""
        return self.b * n * self.ratio

    def observe(self, widths: list[int], rows: int, seconds: float) -> None:
        """A ``propose`` of ``rows`` rows ran forwards of ``widths`` rows each and took ``seconds``."""
        self.samples += 1
        w = max(COST_ALPHA, 1.0 / self.samples)
        line = sum(self.a + self.b * n for n in widths)
        if line > 0:
            # one odd call (a GC, a page fault) moves it little; calls steadily off the line move it all the way
            r = min(2.0 * self.ratio, max(0.5 * self.ratio, seconds / line))
            self.ratio += w * (r - self.ratio)
        elif rows:
            self.host += w * (seconds / rows - self.host)


class Controller:
    def __init__(self, k_max: int, auto: bool = True, cost: Optional[CostModel] = None,
                 draft: Optional[DraftCost] = None):
        self.k_max, self.auto = k_max, auto
        self.cost = cost or CostModel()
        self.draft = draft or DraftCost()
        self.rows: dict[int, RowStats] = {}
        self._promise = 0.0
        self._catchup: dict[int, float] = {}  # uid -> seconds of catch-up charged to a step drafting for it (``plan``)
        # Batch size -> [EWMA of realized / promised tokens per second of planned verify steps, samples]: what the
        # step costs, acceptance and drafting add up to, checked against what such steps then delivered
        self.delivered: dict[int, list] = {}
        self._delivered_all = [1.0, 0]  # the same over every batch size (for a size not measured yet)
        self.promised = 0.0  # the model's tokens/s for the last plan (0: none, or a probe)
        self._probe_every = self._probe_in = PROBE_FIRST
        self.counters = dict(spec_steps=0, spec_rows_planned=0, spec_rows_off=0, spec_drafted_tokens=0,
                             spec_accepted_tokens=0, spec_verifies=0, spec_probes=0,
                             spec_probes_skipped=0)

    def row(self, uid: int) -> RowStats:
        st = self.rows.get(uid)
        if st is None:
            st = self.rows[uid] = RowStats()
        return st

    def forget(self, uid: int) -> None:
        self.rows.pop(uid, None)

    # -- deciding -------------------------------------------------------------------------
    def plan(self, rows: list[tuple], forced_sync: bool = False) -> dict[int, int]:
        """``rows``: (uid, the most tokens it may draft now[, positions its proposer must catch up on first]) of
        every decoding row -> uid: K for the rows that should ask their proposer this step (absent: decode as
        usual)."""
        if not self.auto:
            return {uid: min(k, self.k_max) for uid, k, *_ in rows if k > 0}
        B = len(rows)
        # A catch-up (a draft model's first ask of a row writes its prompt's draft K/V) is paid once and serves
        # every later step of the row: charged spread over the fewest steps the row has left (all drafts accepted).
        self._catchup = {uid: self.draft.catchup(rest[0]) / max(1, kmax // (self.k_max + 1))
                         for uid, kmax, *rest in rows if rest and rest[0] > 0}
        rows = [(uid, kmax) for uid, kmax, *_ in rows]
        items = []  # (expected tokens, uid, i) of each row's i-th drafted token
        for uid, kmax in rows:
            st = self.row(uid)
            v = st.hit
            for i in range(min(kmax, self.k_max)):
                v *= st.alpha
                items.append((v, uid, i))
        items.sort(key=lambda t: (-t[0], t[2]))
        take = self._take(items, B, forced_sync)
        self.promised = self._promise if take else 0.0
        plan: dict[int, int] = {}
        for _, uid, _ in items[:take]:
            plan[uid] = plan.get(uid, 0) + 1
        self.counters["spec_rows_planned"] += len(plan)
        self.counters["spec_rows_off"] += B - len(plan)
        self._probe_in -= 1
        if self._probe_in <= 0:  # every row left out drafts one token, in this one step
            left = [(uid, kmax) for uid, kmax in rows if uid not in plan and kmax > 0]
            if left and self._could_pay(items[:take], left, B, forced_sync):
                self._probe_in = self._probe_every = min(PROBE_MAX, self._probe_every * 2)
                for uid, _ in left:
                    plan[uid] = 1
                self.promised = 0.0  # a probe measures rows, not the plan
                self.counters["spec_probes"] += len(left)
            else:  # nothing to probe, or nothing a probe could find would pay at this batch size
                self._probe_in = self._probe_every
                self.counters["spec_probes_skipped"] += len(left)
        if plan:
            self.counters["spec_steps"] += 1
        return plan

    def _take(self, items: list[tuple[float, int, int]], B: int, forced_sync: bool) -> int:
        """How many of ``items`` (expected tokens, uid, depth), best first, to draft: the prefix that maximizes
        the batch's expected tokens per second (the verify step plus the drafting), 0 if none beats not
        speculating by ``MARGIN``."""
        cost, draft = self.cost, self.draft
        best, take, gain = B / cost.predict(B, forced_sync) * MARGIN, 0, 0.0
        eff = self.efficiency(B)
        width: dict[int, int] = {}  # depth -> rows drafting a token there: the width of the draft's forward
        asked: set[int] = set()
        drafting = 0.0
        for j, (v, uid, i) in enumerate(items):
            gain += v
            w = width.get(i, 0)
            drafting += draft.forward(w + 1) - draft.forward(w)
            width[i] = w + 1
            if uid not in asked:
                asked.add(uid)
                drafting += draft.host + self._catchup.get(uid, 0.0)
            tp = (B + gain) / (cost.predict(B + j + 1, True) + drafting)
            if tp * eff > best:
                best, take, self._promise = tp * eff, j + 1, tp
        return take

    def efficiency(self, B: int) -> float:
        """What planned verify steps at this batch size delivered against the model's promise (1.0 unmeasured)."""
        for got in (self.delivered.get(B), self._delivered_all):
            if got is not None and got[1] >= BUCKET_MIN:
                return got[0]
        return 1.0

    def realized(self, B: int, promised: float, delivered: float) -> None:
        """A planned verify step of ``B`` rows delivered ``delivered`` tokens/s where the model promised ``promised``."""
        r = min(2.0, max(0.25, delivered / promised))
        for got in (self.delivered.setdefault(B, [1.0, 0]), self._delivered_all):
            got[1] += 1
            got[0] += max(COST_ALPHA, 1.0 / got[1]) * (r - got[0])

    def _could_pay(self, planned: list, left: list[tuple[int, int]], B: int, forced_sync: bool) -> bool:
        """Whether a probe could change a plan: would the rows left out be drafted for if their drafts were
        as good as drafts get (``PROBE_ALPHA``)? Under load, where even such a row would not pay for the
        extra query tokens and the synced step, a probe is a pure cost (a synced step of 2B tokens every
        few steps), so it is skipped, and tried again when the batch is smaller."""
        items = list(planned)
        for uid, kmax in left:
            v = 1.0
            for i in range(min(kmax, self.k_max)):
                v *= PROBE_ALPHA
                items.append((v, uid, i))
        items.sort(key=lambda t: (-t[0], t[2]))
        out = {uid for uid, _ in left}
        return any(uid in out for _, uid, _ in items[:self._take(items, B, forced_sync)])

    # -- measuring ------------------------------------------------------------------------
    def asked(self, uid: int, found: bool) -> None:
        st = self.row(uid)
        st.hits = st.hits * HIT_DECAY + found
        st.asks = st.asks * HIT_DECAY + 1.0

    def verified(self, uid: int, drafted: int, accepted: int) -> None:
        st = self.row(uid)
        st.accepted = st.accepted * ROW_DECAY + accepted
        st.rejected = st.rejected * ROW_DECAY + (accepted < drafted)
        st.verifies += 1
        if accepted == drafted:  # a draft wholly accepted: probe often again
            self._probe_every = min(self._probe_every, PROBE_FIRST)
            self._probe_in = min(self._probe_in, PROBE_FIRST)
        c = self.counters
        c["spec_verifies"] += 1
        c["spec_drafted_tokens"] += drafted
        c["spec_accepted_tokens"] += accepted

    def step_cost(self, n: int, sync: bool, seconds: float) -> None:
        self.cost.observe(n, sync, seconds)

    def draft_cost(self, widths: list[int], rows: int, seconds: float) -> None:
        self.draft.observe(widths, rows, seconds)

    def reset_counters(self) -> None:
        self.counters = dict.fromkeys(self.counters, 0)

    def stats(self) -> dict:
        c = dict(self.counters)
        c["spec_acceptance_rate"] = c["spec_accepted_tokens"] / c["spec_drafted_tokens"] if c["spec_drafted_tokens"] else 0.0
        m = self.cost
        d = self.draft
        c.update(spec_cost_step_s=m.a, spec_cost_token_s=m.b, spec_cost_plain_ratio=m.ratio[False],
                 spec_cost_sync_ratio=m.ratio[True], spec_draft_forward_s=d.forward(1),
                 spec_draft_host_s=d.host, spec_delivered_ratio=self._delivered_all[0])
        return c


def calibrate(run: Callable[[int], float], sizes=(1, 2, 4, 8, 16, 32)) -> CostModel:
    """A cost model whose prior is fitted to ``run(n)`` (seconds of one forward of n query tokens, including
    building its graph), the fastest of three each, after one warm call."""
    run(sizes[-1])
    xs, ys = [], []
    for n in sizes:
        xs.append(n)
        ys.append(min(run(n) for _ in range(3)))
    b, a = np.polyfit(np.array(xs, dtype=np.float64), np.array(ys), 1)
    return CostModel(max(float(a), 1e-4), max(float(b), 1e-6))
