"""Scheduler side: the KV-cache spec every sparsemm layer reports, and its block manager.

The manager runs in EngineCore. It gives a request the standard blocks while it
prefills, releases what compaction frees once the prompt has been processed
(the precedent is vLLM's ``RSWAManager``), and from then on grows the block
list by :class:`~vllm_sparsemm.block_law.BlockLaw`. Prefix caching never
applies: compaction rewrites block contents.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_sparsemm.block_law import BlockLaw
from vllm_sparsemm.config import BudgetPlan
from vllm_sparsemm.page_plan import cdiv


@dataclass(frozen=True, kw_only=True)
class SparseMMSpec(FullAttentionSpec):
    """A full-attention layer whose requests are compressed by ``plan`` after prefill."""
    plan: BudgetPlan
    tp_size: int = 1
    # output tokens of growth admission reserves per running request (up to
    # its max_tokens); -1: all of max_tokens; 0: vLLM's optimistic admission
    admission_reserve: int = 256

    @classmethod
    def merge(cls, specs: list["SparseMMSpec"]) -> "SparseMMSpec":
        # FullAttentionSpec.merge rebuilds the base class fields only.
        plans = {(spec.plan, spec.tp_size, spec.admission_reserve)
                 for spec in specs}
        assert all(isinstance(s, SparseMMSpec) for s in specs) and len(
            plans) == 1, "all sparsemm layers of a KV group must share one plan"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        plan, tp_size, admission_reserve = plans.pop()
        return cls(block_size=base.block_size,
                   num_kv_heads=base.num_kv_heads,
                   head_size=base.head_size,
                   head_size_v=base.head_size_v,
                   dtype=base.dtype,
                   kv_quant_mode=base.kv_quant_mode,
                   page_size_padded=base.page_size_padded,
                   indexes_kv_by_block_stride=base.indexes_kv_by_block_stride,
                   sliding_window=base.sliding_window,
                   attention_chunk_size=base.attention_chunk_size,
                   non_causal=base.non_causal,
                   plan=plan,
                   tp_size=tp_size,
                   admission_reserve=admission_reserve)


class SparseMMManager(FullAttentionManager):
    """Block lists of compressed requests (see ``block_law`` for the layout),
    and an admission gate that counts what running requests will still claim.

    vLLM admits a waiting request when its prompt fits in the free blocks and
    preempts (recomputes) the newest running request when a running one
    cannot grow. A compressed request's growth is a large share of its
    footprint (B=256 on LLaVA-NeXT: ~30 blocks after compaction, one more
    per 16 output tokens), so optimistic admission fills the pool and growth
    then preempts decoding requests, each of which recomputes its whole
    prompt. The gate therefore also reserves the rest of every unfinished
    prefill and each running request's growth over the next
    ``admission_reserve`` output tokens (or up to its ``max_tokens``).
    """

    def __init__(self, kv_cache_spec: SparseMMSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.law = BlockLaw(kv_cache_spec.plan, self.block_size,
                            kv_cache_spec.tp_size)
        self._prompt_len: dict[str, int] = {}
        self.admission_reserve_tokens = kv_cache_spec.admission_reserve
        self._limit: dict[str, int] = {}  # prompt + max_tokens (capped)
        self._tokens: dict[str, int] = {}  # tokens with a slot so far
        # Request -> (K_c, n_c), the released entries, fixed once E (the end
        # of the step that processed its last prompt token) is known; present
        # once the request is compacted (vLLM asks for every running request
        # at every step: kept, not recomputed)
        self._released: dict[str, tuple[int, int]] = {}
        self._removed: set[str] = set()  # requests whose entries went back

    def _note_progress(self, request_id: str, computed: int) -> None:
        if request_id in self._released:
            return
        prompt_len = self._prompt_len.get(request_id)
        if (prompt_len is not None and computed >= prompt_len
                and self.law.compresses(prompt_len)):
            self._released[request_id] = self.law.released_range(prompt_len,
                                                                 computed)

    def _slot_tokens(self, request_id: str, num_tokens: int) -> int:
        """``num_tokens`` for the standard arithmetic that yields our list length."""
        released = self._released.get(request_id)
        if released is None:
            return num_tokens
        return self.law.compacted_list_length(
            self._prompt_len[request_id], released,
            num_tokens) * self.block_size

    def note_request(self, request_id: str, prompt_len: int,
                     limit: int) -> None:
        """Prompt length and the most tokens ``request_id`` can reach, before
        its first allocation (``patches.py``: vLLM passes managers ids only)."""
        self._prompt_len[request_id] = prompt_len
        self._limit[request_id] = limit

    def is_noted(self, request_id: str) -> bool:
        """Whether ``note_request`` ran for this request since it was last freed."""
        return request_id in self._limit

    def _held_blocks(self, request_id: str) -> int:
        """Real blocks held (released entries of the list are null blocks)."""
        held = len(self.req_to_blocks.get(request_id, ()))
        released = self._released.get(request_id)
        if released is not None:
            held -= released[1] - released[0]
        return held

    def _peak_blocks(self, request_id: str, prompt_len: int, tokens: int) -> int:
        """Most real blocks the request holds until it has ``tokens`` tokens."""
        law = self.law
        if not law.compresses(prompt_len):
            return cdiv(max(tokens, prompt_len), self.block_size)
        grown = law.compacted_blocks(prompt_len, max(tokens - prompt_len, 0))
        if request_id in self._released:
            return grown
        # the whole prompt is held until compaction
        return max(cdiv(prompt_len, self.block_size), grown)

    def _reserve_until(self, request_id: str, tokens: int) -> int:
        """Tokens the reserve covers: ``admission_reserve`` more, within the limit."""
        limit = self._limit.get(request_id, tokens)
        if self.admission_reserve_tokens < 0:
            return max(limit, tokens)
        return max(min(limit, tokens + self.admission_reserve_tokens), tokens)

    def admission_reserve(self, request_id: str, num_tokens: int) -> int:
        """Blocks to find free, beyond the ``num_tokens`` vLLM counts, before
        admitting ``request_id``: its own growth past them, plus every
        running request's remaining prefill and growth (class docstring)."""
        if self.admission_reserve_tokens == 0 or not self.req_to_blocks:
            return 0  # with nothing running, never hold a request back
        prompt_len = self._prompt_len.get(request_id, num_tokens)
        reserve = max(0, self._peak_blocks(
            request_id, prompt_len, self._reserve_until(
                request_id, num_tokens)) - cdiv(num_tokens, self.block_size))
        for other, other_prompt in self._prompt_len.items():
            if other == request_id or other not in self.req_to_blocks:
                continue
            tokens = self._tokens.get(other, other_prompt)
            peak = self._peak_blocks(other, other_prompt,
                                     self._reserve_until(other, tokens))
            reserve += max(0, peak - self._held_blocks(other))
        return reserve

    def remove_skipped_blocks(self, request_id: str,
                              processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        # vLLM calls this first in every allocate_slots, with the prompt length.
        if num_prompt_tokens is None:
            return
        self._prompt_len[request_id] = num_prompt_tokens
        if (processed_computed_tokens < num_prompt_tokens
                or request_id in self._removed):
            return  # compaction not processed yet, or its entries already freed
        self._note_progress(request_id, processed_computed_tokens)
        released = self._released.get(request_id)
        if released is not None:
            self._remove_blocks_in_range(request_id, *released)
            self._removed.add(request_id)

    def get_num_blocks_to_allocate(self, request_id, num_tokens,
                                   new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens,
                                   num_tokens_main_model,
                                   apply_admission_cap=False) -> int:
        self._note_progress(request_id, total_computed_tokens)
        blocks = super().get_num_blocks_to_allocate(
            request_id, self._slot_tokens(request_id, num_tokens),
            new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model,
            apply_admission_cap)
        # vLLM's full-sequence admission gate; a prompt that does not fit on
        # its own is refused anyway, so skip the reserve's walk over requests
        if apply_admission_cap and blocks <= self.block_pool.get_num_free_blocks():
            blocks += self.admission_reserve(request_id, num_tokens)
        return blocks

    def allocate_new_blocks(self, request_id, num_tokens,
                            num_tokens_main_model):
        self._tokens[request_id] = num_tokens
        return super().allocate_new_blocks(
            request_id, self._slot_tokens(request_id, num_tokens),
            num_tokens_main_model)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        for table in (self._prompt_len, self._limit, self._tokens,
                      self._released):
            table.pop(request_id, None)
        self._removed.discard(request_id)

    def cache_blocks(self, *args, **kwargs) -> None:
        return None  # compacted blocks must never serve as prefix-cache hits

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0
