"""How many blocks a request holds at every point of its life: one pure function.

Shared by the scheduler (which allocates and frees) and the workers (which
place tokens), so the two agree without any message between them.

A request with prompt length ``P`` whose prompt is compressed:

* while prefilling it holds ``cdiv(num_tokens, block_size)`` blocks in vLLM's
  standard layout (entry ``i`` holds positions ``[i * bs, (i + 1) * bs)``);
* the step that computes position ``P - 1`` ends at some ``E >= P`` (``E >
  P`` only when a preempted request re-prefills its outputs too); it then
  compacts every head's kept tokens, plus positions ``[P, E)``, into the
  first ``K_c = compacted_blocks(P, E - P)`` entries;
* the block list keeps vLLM's append-only shape: entries ``[K_c, n_c)``
  (``n_c = cdiv(E, bs)``) are released, and later growth appends after
  ``n_c``: with ``T = num_tokens - P`` tokens after the prompt the list is
  ``n_c + compacted_blocks(P, T) - K_c`` long.

The owned blocks in plan-entry order are therefore ``list[:K_c] +
list[n_c:]``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from vllm_sparsemm.budget import compresses, kept_counts
from vllm_sparsemm.config import BudgetPlan
from vllm_sparsemm.page_plan import PagePlan, cdiv


class BlockLaw:
    """Block counts of compressed requests for one model, budget plan and TP size."""

    def __init__(self, plan: BudgetPlan, block_size: int, tp_size: int = 1):
        caps = plan.caps_tensor()
        num_kv_heads = caps.shape[1]
        if tp_size < 1 or num_kv_heads % tp_size:
            raise ValueError(f"sparsemm needs the {num_kv_heads} KV heads to "
                             f"split evenly over tensor-parallel size "
                             f"{tp_size}")
        self.plan = plan
        self.caps = caps
        self.block_size = block_size
        self.tp_size = tp_size
        self.heads_per_rank = num_kv_heads // tp_size

    def compresses(self, prompt_len):
        """Whether a prompt of this length is compressed (elementwise for a
        numpy array of lengths)."""
        return compresses(prompt_len, self.plan.budget)

    @functools.lru_cache(maxsize=4096)
    def kept(self, prompt_len: int) -> torch.Tensor:
        """Kept prompt tokens per (layer, KV head), whole model ``[L, Hkv]``.

        Cached (callers must not modify it): one image size means one prompt
        length for many requests."""
        return kept_counts(self.caps, prompt_len, self.plan.budget,
                           self.plan.window)

    @functools.lru_cache(maxsize=4096)
    def rank_plans(self, prompt_len: int) -> tuple[PagePlan, ...]:
        """One cross-layer page plan per TP rank (each rank owns its heads' pages)."""
        kept = self.kept(prompt_len)
        return tuple(
            PagePlan(kept[:, r * self.heads_per_rank:(r + 1) *
                          self.heads_per_rank].reshape(1, -1), self.block_size)
            for r in range(self.tp_size))

    @functools.lru_cache(maxsize=1 << 16)
    def compacted_blocks(self, prompt_len: int, appended: int) -> int:
        """Blocks held once compacted with ``appended`` tokens after the prompt.

        Every rank lays out its own heads in the same block ids, so the
        request needs the maximum over ranks. Cached: the scheduler asks for
        every running request at every step.
        """
        return max(p.num_blocks(appended) for p in self.rank_plans(prompt_len))

    @functools.lru_cache(maxsize=4096)
    def phase_blocks(self, prompt_len: int) -> np.ndarray:
        """``offsets`` ``[block_size]`` with ``compacted_blocks(prompt_len, a)
        == a // block_size + offsets[a % block_size]`` for every ``a >= 0``.

        Each head gains exactly one page per ``block_size`` appended tokens
        (``PagePlan.num_slots``) and every rank's pool has the same size, so
        the blocks grow by exactly one per ``block_size`` tokens."""
        return np.array([self.compacted_blocks(prompt_len, a)
                         for a in range(self.block_size)], dtype=np.int64)

    def compacted_blocks_many(self, prompt_len: int,
                              appended: np.ndarray) -> np.ndarray:
        """``compacted_blocks`` for an int array of ``appended`` counts (>= 0)
        at once: the admission gate evaluates requests at many future steps."""
        appended = np.asarray(appended, dtype=np.int64)
        return (appended // self.block_size +
                self.phase_blocks(prompt_len)[appended % self.block_size])

    def list_length(self, prompt_len: int, compaction_end: int | None,
                    num_tokens: int) -> int:
        """Length of the request's (append-only) block list covering ``num_tokens``."""
        if compaction_end is None or not self.compresses(prompt_len):
            return cdiv(num_tokens, self.block_size)
        return self.compacted_list_length(
            prompt_len, self.released_range(prompt_len, compaction_end),
            num_tokens)

    def compacted_list_length(self, prompt_len: int,
                              released: tuple[int, int],
                              num_tokens: int) -> int:
        """``list_length`` of a compacted request from its ``released_range``
        (which the scheduler keeps per request)."""
        kept_entries, prompt_entries = released
        return (prompt_entries + self.compacted_blocks(
            prompt_len, num_tokens - prompt_len) - kept_entries)

    def released_range(self, prompt_len: int,
                       compaction_end: int) -> tuple[int, int]:
        """``(K_c, n_c)``: entries ``[K_c, n_c)`` are released after compaction."""
        return (self.compacted_blocks(prompt_len, compaction_end - prompt_len),
                cdiv(compaction_end, self.block_size))
