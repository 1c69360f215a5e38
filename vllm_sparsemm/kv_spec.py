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


@dataclass(frozen=True, kw_only=True)
class SparseMMSpec(FullAttentionSpec):
    """A full-attention layer whose requests are compressed by ``plan`` after prefill."""
    plan: BudgetPlan
    tp_size: int = 1

    @classmethod
    def merge(cls, specs: list["SparseMMSpec"]) -> "SparseMMSpec":
        # FullAttentionSpec.merge rebuilds the base class fields only.
        plans = {(spec.plan, spec.tp_size) for spec in specs}
        assert all(isinstance(s, SparseMMSpec) for s in specs) and len(
            plans) == 1, "all sparsemm layers of a KV group must share one plan"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        plan, tp_size = plans.pop()
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
                   tp_size=tp_size)


class SparseMMManager(FullAttentionManager):
    """Block lists of compressed requests (see ``block_law`` for the layout)."""

    def __init__(self, kv_cache_spec: SparseMMSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.law = BlockLaw(kv_cache_spec.plan, self.block_size,
                            kv_cache_spec.tp_size)
        self._prompt_len: dict[str, int] = {}
        # Request -> E, the end of the step that processed its last prompt token.
        self._compaction_end: dict[str, int] = {}

    def _note_progress(self, request_id: str, computed: int) -> None:
        prompt_len = self._prompt_len.get(request_id)
        if (prompt_len is not None and computed >= prompt_len
                and self.law.compresses(prompt_len)):
            self._compaction_end.setdefault(request_id, computed)

    def _slot_tokens(self, request_id: str, num_tokens: int) -> int:
        """``num_tokens`` for the standard arithmetic that yields our list length."""
        end = self._compaction_end.get(request_id)
        if end is None:
            return num_tokens
        length = self.law.list_length(self._prompt_len[request_id], end,
                                      num_tokens)
        return length * self.block_size

    def remove_skipped_blocks(self, request_id: str,
                              processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        # vLLM calls this first in every allocate_slots, with the prompt length.
        if num_prompt_tokens is None:
            return
        self._prompt_len[request_id] = num_prompt_tokens
        if processed_computed_tokens < num_prompt_tokens:
            return  # the compaction step has not been processed yet
        self._note_progress(request_id, processed_computed_tokens)
        end = self._compaction_end.get(request_id)
        if end is not None:
            first, last = self.law.released_range(num_prompt_tokens, end)
            self._remove_blocks_in_range(request_id, first, last)

    def get_num_blocks_to_allocate(self, request_id, num_tokens,
                                   new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens,
                                   num_tokens_main_model,
                                   apply_admission_cap=False) -> int:
        self._note_progress(request_id, total_computed_tokens)
        return super().get_num_blocks_to_allocate(
            request_id, self._slot_tokens(request_id, num_tokens),
            new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model,
            apply_admission_cap)

    def allocate_new_blocks(self, request_id, num_tokens,
                            num_tokens_main_model):
        return super().allocate_new_blocks(
            request_id, self._slot_tokens(request_id, num_tokens),
            num_tokens_main_model)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._prompt_len.pop(request_id, None)
        self._compaction_end.pop(request_id, None)

    def cache_blocks(self, *args, **kwargs) -> None:
        return None  # compacted blocks must never serve as prefix-cache hits

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0
