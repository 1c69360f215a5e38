"""The compaction moves as the engine builds and caches them (a plan's kept
counts on the device plus an appended tail, the total from the host) give
the rows of ``pages.compaction_rows`` over the same counts, for any plan
and tail."""

import pytest
import torch

from vllm_sparsemm.core.pages import (CompactionMoves, PagePlan, PageSpace,
                                      RequestLayout, compaction_rows)

LAYERS, KV_HEADS, BS = 3, 2, 4


def _positions(gen, counts, prompt_len, n):
    """Kept positions ``[n, L, Hkv, width]``: ascending, padded with -1."""
    width = int(counts.max())
    out = torch.full((n, LAYERS, KV_HEADS, width), -1, dtype=torch.int64)
    for r in range(n):
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                count = int(counts[layer, head])
                picked = torch.randperm(prompt_len, generator=gen)[:count]
                out[r, layer, head, :count] = picked.sort().values
    return out


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moves_equal_the_reference_rows(seed, extra):
    gen = torch.Generator().manual_seed(seed)
    prompt_len, n = 37, 3
    counts = torch.randint(1, 20, (LAYERS, KV_HEADS), generator=gen)
    space = PageSpace(LAYERS, 64, KV_HEADS, BS)
    plan = PagePlan(counts.reshape(1, -1), BS)
    num_blocks = plan.num_blocks(extra)
    positions = _positions(gen, counts, prompt_len, n)
    if extra:  # the tail every head keeps, after its kept prompt tokens
        tail = torch.arange(prompt_len, prompt_len + extra)
        wide = torch.full(positions.shape[:-1] + (positions.shape[-1] + extra,),
                          -1, dtype=torch.int64)
        for r in range(n):
            for layer in range(LAYERS):
                for head in range(KV_HEADS):
                    count = int(counts[layer, head])
                    wide[r, layer, head, :count] = positions[r, layer, head,
                                                             :count]
                    wide[r, layer, head, count:count + extra] = tail
        positions = wide
    prompt_blocks = torch.randperm(64, generator=gen)[:n * 12].view(n, 12)
    fresh = torch.randperm(64, generator=gen)[:n * num_blocks].view(
        n, num_blocks)
    layout = RequestLayout(space, counts, 1, fresh, plan=plan)
    want_src, want_dst = compaction_rows(layout, prompt_blocks, positions,
                                         counts + extra)
    moves = CompactionMoves(  # as WorkerKVState.compaction_moves builds them
        space, plan, plan.counts.view(counts.shape) + extra, num_blocks,
        total=int(counts.sum()) + extra * counts.numel())
    src, dst = moves.rows(prompt_blocks, positions, fresh)
    assert torch.equal(src, want_src)
    assert torch.equal(dst, want_dst)
    assert moves.nbytes == 16 * int((counts + extra).sum())
