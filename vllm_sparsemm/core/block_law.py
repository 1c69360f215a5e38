"""How many blocks a request holds at every point of its life: one pure function.

Shared by the scheduler (which allocates and frees) and the workers (which
place tokens), so the two agree without any message between them.

A request with prompt length ``P`` whose prompt is compressed:

* while prefilling it holds ``cdiv(num_tokens, block_size)`` blocks in vLLM's
  standard layout (entry ``i`` holds positions ``[i * bs, (i + 1) * bs)``);
  its full prompt blocks are hashed for prefix caching as stock vLLM does;
* the step that computes position ``P - 1`` ends at some ``E >= P`` (``E >
  P`` only when a preempted request re-prefills its outputs too). When it is
  scheduled, ``K_c = compacted_blocks(P, E - P)`` fresh entries follow the
  ``n_c = cdiv(E, bs)`` standard ones, and the step copies every head's kept
  tokens, plus positions ``[P, E)``, into them: out of place, so the prompt
  blocks are only read;
* once that step's output is processed, entries ``[0, n_c)`` go back to
  vLLM's pool untouched: still hashed, they stay prefix-cache hits until the
  pool evicts them;
* later growth appends: with ``T = num_tokens - P`` tokens after the prompt
  the list is ``n_c + compacted_blocks(P, T)`` long.

The owned blocks in plan-entry order are therefore ``list[n_c:]``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import torch

from vllm_sparsemm.core.budget import BudgetPlan, compresses, kept_counts
from vllm_sparsemm.core.pages import PagePlan, cdiv


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
        # per-instance caches: one image size means one prompt length for
        # many requests, and the scheduler asks for every running request at
        # every step (a cache on the class would keep every law alive)
        self.kept = functools.lru_cache(maxsize=4096)(self._kept)
        self.rank_plans = functools.lru_cache(maxsize=4096)(self._rank_plans)
        self.compacted_blocks = functools.lru_cache(maxsize=1 << 16)(
            self._compacted_blocks)
        self.phase_blocks = functools.lru_cache(maxsize=4096)(
            self._phase_blocks)

    def compresses(self, prompt_len):
        """Whether a prompt of this length is compressed (elementwise for a
        numpy array of lengths)."""
        return compresses(prompt_len, self.plan.budget)

    def _kept(self, prompt_len: int) -> torch.Tensor:
        """Kept prompt tokens per (layer, KV head), whole model ``[L, Hkv]``
        (cached: callers must not modify it)."""
        return kept_counts(self.caps, prompt_len, self.plan.budget,
                           self.plan.window)

    def _rank_plans(self, prompt_len: int) -> tuple[PagePlan, ...]:
        """One cross-layer page plan per TP rank (each rank owns its heads' pages)."""
        kept = self.kept(prompt_len)
        return tuple(
            PagePlan(kept[:, r * self.heads_per_rank:(r + 1) *
                          self.heads_per_rank].reshape(1, -1), self.block_size)
            for r in range(self.tp_size))

    def _compacted_blocks(self, prompt_len: int, appended: int) -> int:
        """Blocks held once compacted with ``appended`` tokens after the prompt.

        Every rank lays out its own heads in the same block ids, so the
        request needs the maximum over ranks.
        """
        return max(p.num_blocks(appended) for p in self.rank_plans(prompt_len))

    def _phase_blocks(self, prompt_len: int) -> np.ndarray:
        """``offsets`` ``[block_size]`` with ``compacted_blocks(prompt_len, a)
        == a // block_size + offsets[a % block_size]`` for every ``a >= 0``.

        Each head gains exactly one page per ``block_size`` appended tokens
        (``PagePlan.num_slots``) and every rank's pool has the same size, so
        the blocks grow by exactly one per ``block_size`` tokens."""
        appended = torch.arange(self.block_size)
        return torch.stack([plan.num_blocks_many(appended)
                            for plan in self.rank_plans(prompt_len)]
                           ).amax(0).numpy().astype(np.int64)

    def compacted_blocks_many(self, prompt_len: int,
                              appended: np.ndarray) -> np.ndarray:
        """``compacted_blocks`` for an int array of ``appended`` counts (>= 0)
        at once: the admission gate evaluates requests at many future steps."""
        appended = np.asarray(appended, dtype=np.int64)
        return (appended // self.block_size +
                self.phase_blocks(prompt_len)[appended % self.block_size])

    def prompt_entries(self, compaction_end: int) -> int:
        """``n_c``: the standard entries before the compacted ones."""
        return cdiv(compaction_end, self.block_size)

    def peak_blocks(self, prompt_len: int) -> int:
        """The most blocks a request of ``prompt_len`` tokens holds before it
        decodes: its prompt's, plus its compacted ones in the step that
        compacts it (out of place, both at once)."""
        blocks = cdiv(prompt_len, self.block_size)
        if self.compresses(prompt_len):
            blocks += self.compacted_blocks(prompt_len, 0)
        return blocks

    def list_length(self, prompt_len: int, compaction_end: int | None,
                    num_tokens: int) -> int:
        """Length of the request's (append-only) block list covering
        ``num_tokens``; ``compaction_end`` is ``E`` once the compaction step
        is scheduled (None before)."""
        if compaction_end is None or not self.compresses(prompt_len):
            return cdiv(num_tokens, self.block_size)
        return self.prompt_entries(compaction_end) + self.compacted_blocks(
            prompt_len, num_tokens - prompt_len)

    def max_list_length(self, max_len: int) -> int:
        """The longest block list any request up to ``max_len`` tokens can
        have: the width of the workers' block-table rows.

        ``list_length`` grows with ``E`` and the tokens, so its maximum is
        ``cdiv(max_len, bs) + max over P of compacted_blocks(P, max_len - P)``
        (a request re-prefilled up to ``max_len`` after a preemption). Past
        ``P = max cap + W`` every head keeps a fixed count and fewer tokens
        follow the prompt, so only shorter prompts need checking.
        """
        standard = cdiv(max_len, self.block_size)
        budget, window = self.plan.budget, self.plan.window
        if max_len <= budget:  # nothing is compressed
            return standard
        # the first compressed length, and every one up to max cap + W
        last = min(max_len, max(budget + 1, int(self.caps.max()) + window))
        prompts = np.arange(budget + 1, last + 1, dtype=np.int64)
        return standard + max(
            int(_compacted_blocks_at(self._rank_caps(r), window,
                                     self.block_size, chunk,
                                     max_len - chunk).max())
            for r in range(self.tp_size)
            for chunk in np.array_split(prompts, cdiv(len(prompts), 256)))

    def _rank_caps(self, rank: int) -> np.ndarray:
        heads = slice(rank * self.heads_per_rank,
                      (rank + 1) * self.heads_per_rank)
        return self.caps[:, heads].reshape(-1).numpy()


class LawBook:
    """The block law of every budget requests ask for (``sparsemm_budget``),
    built on demand from the server's plan: the default budget's law always,
    and up to ``MAX_BUDGETS`` others, least recently used dropped."""

    MAX_BUDGETS = 32

    def __init__(self, plan: BudgetPlan, block_size: int, tp_size: int = 1):
        self.default = BlockLaw(plan, block_size, tp_size)
        self.block_size = block_size
        self._others: OrderedDict[int, BlockLaw] = OrderedDict()

    def law(self, budget: int | None) -> BlockLaw | None:
        """The law of ``budget`` (None: the default; 0: no compression)."""
        if budget is None or budget == self.default.plan.budget:
            return self.default
        if budget == 0:
            return None
        law = self._others.pop(budget, None)
        if law is None:
            law = BlockLaw(self.default.plan.for_budget(budget),
                           self.block_size, self.default.tp_size)
        self._others[budget] = law
        if len(self._others) > self.MAX_BUDGETS:
            self._others.popitem(last=False)
        return law


def _compacted_blocks_at(caps: np.ndarray, window: int, block_size: int,
                         prompts: np.ndarray,
                         appended: np.ndarray) -> np.ndarray:
    """``PagePlan.num_blocks`` of one rank's heads (``caps [F]``) for many
    compressed prompt lengths at once (``prompts``, ``appended`` ``[n]``):
    each head's prefix pages, then one page per ``block_size`` tokens past
    the free room of its last one, in blocks of ``F`` pages."""
    kept = np.minimum(caps[None], prompts[:, None] - window) + window
    pages = cdiv(kept, block_size)
    room = pages * block_size - kept
    grown = cdiv(np.maximum(appended[:, None] - room, 0), block_size)
    return cdiv((pages + grown).sum(axis=1), caps.size)
