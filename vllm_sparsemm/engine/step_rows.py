"""The rows of one step as the model runner knows them.

The runner hands the attention builder no request ids or prompt lengths;
``patches.py`` copies them from its input batch into :class:`StepRows` and
hands them to the builder just before it runs (``hand_step``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RowInfo:
    """One batch row of a step, as the runner knows it."""
    req_id: str
    prompt_len: int
    computed: int  # tokens whose KV is cached before this step
    scheduled: int  # query tokens this step

    @property
    def end(self) -> int:
        return self.computed + self.scheduled


class StepRows(Sequence):
    """The rows of one step as the runner's arrays; a :class:`RowInfo` only
    for a row that is asked for.

    The step plans (:func:`plan_step`, ``graph_decode``) work on the arrays
    and look at single rows only where a prompt is in progress: a Python
    object per row is host time that a host-bound step of hundreds of
    decoding rows pays in full.
    """

    def __init__(self, req_ids: list[str], prompt_len: np.ndarray,
                 computed: np.ndarray, scheduled: np.ndarray,
                 budget_of=None):
        # copies: the runner reuses its arrays for the next step
        self.req_ids = req_ids
        # a request's own sparsemm_budget (None: the server's; 0: none),
        # asked only for requests the worker has not seen yet
        self.budget_of = budget_of or (lambda req_id: None)
        self.prompt_len = np.array(prompt_len, dtype=np.int64)
        self.computed = np.array(computed, dtype=np.int64)
        self.scheduled = np.array(scheduled, dtype=np.int64)
        self._rows: list[RowInfo] | None = None

    @property
    def end(self) -> np.ndarray:
        """Per row, ``RowInfo.end``: tokens once this step has run."""
        return self.computed + self.scheduled

    @classmethod
    def of(cls, rows: "Sequence[RowInfo]") -> "StepRows":
        """``rows`` as StepRows (as they are if they already are)."""
        if isinstance(rows, StepRows):
            return rows
        steps = cls([row.req_id for row in rows],
                    [row.prompt_len for row in rows],
                    [row.computed for row in rows],
                    [row.scheduled for row in rows])
        steps._rows = list(rows)
        return steps

    @property
    def rows(self) -> list[RowInfo]:
        if self._rows is None:
            self._rows = [RowInfo(*row) for row in zip(
                self.req_ids, self.prompt_len.tolist(),
                self.computed.tolist(), self.scheduled.tolist())]
        return self._rows

    def __len__(self) -> int:
        return len(self.req_ids)

    def __getitem__(self, index):
        if self._rows is None and isinstance(index, int):
            return RowInfo(self.req_ids[index], int(self.prompt_len[index]),
                           int(self.computed[index]),
                           int(self.scheduled[index]))
        return self.rows[index]

    def __iter__(self):
        return iter(self.rows)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)
