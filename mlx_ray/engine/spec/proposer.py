"""What every proposer offers the paged engine: drafted token ids for rows, from their token ids.

A proposer keeps per-row state only as a cache (keyed by the row's uid) and forgets it when told.
``propose`` gets every row that may speculate this step at once, so a model-based proposer can
batch them; it may return fewer tokens than asked, or none, for a row."""

from __future__ import annotations

from typing import Protocol


class Proposer(Protocol):
    name: str

    def propose(self, asks: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        """``asks``: (uid, the row's tokens so far (prompt + output), at most k) -> uid: drafted tokens (<= k)."""
        ...

    def likely(self, uid: int, tokens: list[int]) -> bool:
        """Whether asking for this row is worth reading the previous step first (``tokens``: what the host has)."""
        ...

    def behind(self, uid: int, tokens: list[int]) -> int:
        """Optional (a proposer with its own KV): the positions its next ask for this row must catch up on first."""
        ...

    def forget(self, uid: int) -> None:
        """The row left the batch."""
        ...

    def stats(self) -> dict:
        ...
