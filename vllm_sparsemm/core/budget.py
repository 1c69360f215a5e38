"""Per-(layer, KV head) cache budgets from visual-head scores (DESIGN section 1).

The budgets are static: computed once per model (or per budget value) and
global across layers, exactly as the SparseMM reference computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_budget_args(budget: int, window: int, ratio: float) -> None:
    """Reject settings the formula cannot use, with the reason."""
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if int(budget) != budget or budget <= window:
        raise ValueError(
            f"budget must be an integer larger than the window ({window}), "
            f"got {budget!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")


def head_budgets(scores: torch.Tensor, num_kv_heads: int, budget: int,
                 window: int = 32, ratio: float = 0.1) -> torch.Tensor:
    """Scored-token cap per (layer, KV head), the window excluded.

    ``scores`` is ``[L, Hq]`` (query heads, un-normalised). Returns int64
    ``[L, num_kv_heads]``::

        b = budget - window;  m = floor(ratio * b)
        s = scores / scores.sum();  s_kv = sum of the G query heads of each KV head
        cap = round_half_even(s_kv * (b - m) * L * Hkv + m)
    """
    return caps_from_shares(kv_head_shares(scores, num_kv_heads), budget,
                            window, ratio)


def kv_head_shares(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``s_kv``: each KV head's share of all scores, float64 ``[L, Hkv]``."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [layers, query heads], got shape "
                         f"{tuple(scores.shape)}")
    num_layers, num_heads = scores.shape
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be split into "
                         f"{num_kv_heads} KV heads")
    total = scores.double().sum()
    if not bool(torch.isfinite(total)) or total <= 0:
        raise ValueError("scores must be finite with a positive sum")
    group = num_heads // num_kv_heads
    return (scores.double() / total).view(num_layers, num_kv_heads,
                                          group).sum(-1)


def caps_from_shares(shares: torch.Tensor, budget: int, window: int,
                     ratio: float) -> torch.Tensor:
    """:func:`head_budgets` from the KV heads' shares (``kv_head_shares``)."""
    check_budget_args(budget, window, ratio)
    num_layers, num_kv_heads = shares.shape
    b = budget - window
    m = math.floor(b * ratio)  # the reference's int(b * ratio)
    pooled = (b - m) * num_layers * num_kv_heads
    return torch.round(shares.double() * pooled + m).to(torch.int64)


def compresses(prompt_len: int, budget: int) -> bool:
    """Whether a prompt is compressed at all: only when the budget is below its length."""
    return budget < prompt_len


def kept_counts(caps: torch.Tensor, prompt_len: int, budget: int,
                window: int = 32) -> torch.Tensor:
    """Prompt tokens each (layer, KV head) keeps after compression, window included.

    ``min(cap, N - W) + W``, or ``N`` for every head when ``budget >= N``
    (then nothing is compressed).
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be positive, got {prompt_len}")
    if not compresses(prompt_len, budget):
        return torch.full_like(caps, prompt_len)
    return caps.clamp(max=prompt_len - window) + window


@dataclass(frozen=True)
class BudgetPlan:
    """Everything both the scheduler and the workers need to agree on a request's layout.

    ``shares`` (each KV head's share of the scores) and ``ratio`` let any
    process derive the plan of another budget (``for_budget``: a request's
    own ``sparsemm_budget``) with the same arithmetic, so the two sides
    agree on it without a message.
    """
    caps: tuple[tuple[int, ...], ...]  # [L][Hkv], whole model
    budget: int
    window: int
    pool_kernel: int
    ratio: float = 0.1
    shares: tuple[tuple[float, ...], ...] = ()  # [L][Hkv]

    @classmethod
    def build(cls, settings, scores: torch.Tensor,
              num_kv_heads: int) -> "BudgetPlan":
        """From ``settings`` (budget, window, ratio, pool_kernel: a
        ``config.SparseMMSettings``) and a score grid ``[L, Hq]``."""
        shares = kv_head_shares(scores, num_kv_heads)
        caps = caps_from_shares(shares, settings.budget, settings.window,
                                settings.ratio)
        return cls(tuple(tuple(row) for row in caps.tolist()), settings.budget,
                   settings.window, settings.pool_kernel, settings.ratio,
                   tuple(tuple(row) for row in shares.tolist()))

    def for_budget(self, budget: int) -> "BudgetPlan":
        """This plan with another budget (same scores, window and ratio)."""
        if budget == self.budget:
            return self
        caps = caps_from_shares(torch.tensor(self.shares, dtype=torch.float64),
                                budget, self.window, self.ratio)
        return BudgetPlan(tuple(tuple(row) for row in caps.tolist()), budget,
                          self.window, self.pool_kernel, self.ratio,
                          self.shares)

    def caps_tensor(self) -> torch.Tensor:
        return torch.tensor(self.caps, dtype=torch.int64)
