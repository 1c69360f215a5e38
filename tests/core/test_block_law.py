"""The block law shared by scheduler and workers, including tensor parallelism
simulated on CPU: each rank owns Hkv / tp heads, the block count is the
maximum over ranks, and each rank's selection equals the single-rank one."""

import numpy as np
import pytest
import torch

from vllm_sparsemm.core.block_law import BlockLaw
from vllm_sparsemm.core.budget import head_budgets
from vllm_sparsemm.core.budget import BudgetPlan
from vllm_sparsemm.engine.config import SparseMMSettings
from vllm_sparsemm.core.pages import PagePlan, cdiv
from vllm_sparsemm.core.selection import kept_positions


def _plan(num_layers=4, num_heads=8, num_kv_heads=4, budget=64, seed=0):
    scores = torch.rand(num_layers, num_heads,
                        generator=torch.Generator().manual_seed(seed)) ** 3
    return BudgetPlan.build(SparseMMSettings(budget=budget, window=8), scores,
                            num_kv_heads)


def test_uncompressed_prompts_grow_like_vllm():
    law = BlockLaw(_plan(budget=64), block_size=16)
    assert not law.compresses(64)
    for tokens in (1, 16, 17, 200):
        assert law.list_length(64, None, tokens) == cdiv(tokens, 16)
        assert law.list_length(64, 64, tokens) == cdiv(tokens, 16)


def test_compressed_list_keeps_its_append_only_shape():
    """Prompt entries, then the compacted ones appended at the compaction
    step, then growth: never shorter, and the owned tail list[n_c:] is the
    plan's count."""
    law = BlockLaw(_plan(budget=64), block_size=16)
    prompt = 300
    entries = law.prompt_entries(prompt)
    assert entries == cdiv(300, 16)
    assert law.list_length(prompt, None, prompt) == entries  # not scheduled
    previous = entries
    for tokens in range(prompt, prompt + 100):
        length = law.list_length(prompt, prompt, tokens)
        assert length >= previous  # never shrinks: the worker only appends
        assert length - entries == law.compacted_blocks(prompt, tokens - prompt)
        previous = length
    assert 1 <= law.compacted_blocks(prompt, 0) < entries


def test_compaction_after_the_prompt_end_counts_those_tokens():
    law = BlockLaw(_plan(budget=64), block_size=16)
    # a re-prefill after a preemption ended its compaction step at 340
    assert law.list_length(300, 340, 340) == cdiv(340, 16) + (
        law.compacted_blocks(300, 40))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("budget", [40, 64, 200])
def test_row_width_is_the_longest_list_any_request_reaches(tp, budget):
    """The workers' block-table row (``max_list_length``) against every
    (prompt, compaction end, tokens) a request up to max_len can have."""
    law = BlockLaw(_plan(budget=budget), block_size=16, tp_size=tp)
    for max_len in (budget, budget + 1, 97, 300, 701):
        longest = max(law.list_length(p, e, n)
                      for p in range(1, max_len + 1)
                      for e in (None, p, (p + max_len) // 2, max_len)
                      for n in ([p, max_len] if e is None else [e, max_len])
                      if e is None or p <= e <= n)
        assert law.max_list_length(max_len) == longest
        assert longest >= cdiv(max_len, 16)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_block_count_is_the_max_over_ranks(tp):
    """Each rank places its own heads' pages by ``PagePlan.slots``: every
    token of every head of every rank must land inside the law's blocks,
    no two pages on one slot, and the busiest rank must need the last one."""
    law = BlockLaw(_plan(), block_size=16, tp_size=tp)
    kept = law.kept(500)
    per = 4 // tp
    for appended in (0, 5, 40):
        blocks = law.compacted_blocks(500, appended)
        needed = 0
        for r in range(tp):
            counts = kept[:, r * per:(r + 1) * per].reshape(1, -1)
            plan = PagePlan(counts, 16)
            pool = counts.shape[1]
            seen = set()
            for head in range(pool):
                tokens = int(counts[0, head]) + appended
                slots = {_slot(plan, head, i) for i in range(0, tokens, 16)}
                assert not slots & seen
                seen |= slots
            needed = max(needed, max(seen) // pool + 1)
        assert needed == blocks
    # splitting the heads never needs fewer blocks than one rank holding all
    # of them in pools of its size
    assert law.compacted_blocks(500, 0) >= cdiv(int(cdiv(kept, 16).sum()),
                                                 4 * 4)


def _slot(plan, head, index):
    return int(plan.slots(torch.tensor(0), torch.tensor(head),
                          torch.tensor(index)))


def test_tensor_parallel_ranks_select_what_one_rank_would():
    gen = torch.Generator().manual_seed(1)
    num_heads, num_kv_heads, tp, window = 8, 4, 2, 8
    queries = torch.randn(window, num_heads, 16, generator=gen)
    keys = torch.randn(100, num_kv_heads, 16, generator=gen)
    caps = head_budgets(torch.rand(1, num_heads, generator=gen), num_kv_heads,
                        40, window)[0]
    full_pos, full_counts = kept_positions(queries, keys, caps)
    per = num_kv_heads // tp
    for r in range(tp):
        heads = slice(r * per, (r + 1) * per)
        q_heads = slice(r * num_heads // tp, (r + 1) * num_heads // tp)
        pos, counts = kept_positions(queries[:, q_heads], keys[:, heads],
                                     caps[heads])
        assert torch.equal(counts, full_counts[heads])
        assert torch.equal(pos, full_pos[heads, :pos.shape[1]])


def test_heads_must_split_over_ranks():
    with pytest.raises(ValueError, match="split evenly"):
        BlockLaw(_plan(num_kv_heads=4), 16, tp_size=3)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_blocks_grow_by_one_per_block_of_tokens_from_a_phase_offset(
        tp_size, block_size):
    """The admission gate's closed form (``phase_blocks``,
    ``compacted_blocks_many``) equals the page plan's count for every
    appended length, prompt length and TP size."""
    law = BlockLaw(_plan(num_kv_heads=8, budget=48), block_size, tp_size)
    for prompt in (200, 301, 1000):
        appended = np.arange(0, 5 * block_size + 3)
        expected = [law.compacted_blocks(prompt, int(a)) for a in appended]
        assert law.compacted_blocks_many(prompt, appended).tolist() == expected
        assert law.compacted_blocks_many(
            prompt, appended.reshape(-1, 1)).ravel().tolist() == expected
