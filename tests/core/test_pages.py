"""Page plans: slot layout by hand, invariants, DESIGN's memory table, and a full
compaction -> decode-append -> page-list attention round trip on references."""

from pathlib import Path

import pytest
import torch

from vllm_sparsemm.core.budget import head_budgets, kept_counts
from vllm_sparsemm.core.scores import load_head_scores
from vllm_sparsemm.kernels.kv_ops import (copy_rows_reference,
                                          paged_attention_reference,
                                          write_rows)
from vllm_sparsemm.core.pages import (PagePlan, PageSpace, RequestLayout, cdiv,
                                      compaction_rows)
from vllm_sparsemm.core.selection import select_kept

VICUNA = Path(__file__).resolve().parents[2] / "head_scores" / (
    "llava-v1.6-vicuna-7b.json")


def _slot(plan, head, index):
    return int(plan.slots(torch.tensor(0), torch.tensor(head),
                          torch.tensor(index)))


def test_slots_by_hand():
    # block_size 4, three heads holding 5, 16 and 1 tokens:
    # compressed pages 2, 4, 1 -> slots [0, 1], [2..5], [6]; 7 slots, 3 blocks.
    plan = PagePlan(torch.tensor([[5, 16, 1]]), block_size=4)
    assert [_slot(plan, 0, i) for i in (0, 4)] == [0, 1]
    assert [_slot(plan, 1, i) for i in (0, 4, 8, 12)] == [2, 3, 4, 5]
    assert _slot(plan, 2, 0) == 6
    assert plan.num_blocks(0) == 3
    # free room 3, 0, 3: head 1 needs a page at the first appended token,
    # heads 0 and 2 at the fourth; new pages go in that order, one per head
    # per 4 tokens, each head on a fixed sub-page of consecutive blocks.
    assert _slot(plan, 1, 16) == 7 and _slot(plan, 1, 20) == 10
    assert _slot(plan, 0, 8) == 8 and _slot(plan, 0, 12) == 11
    assert _slot(plan, 2, 4) == 9 and _slot(plan, 2, 8) == 12
    assert [int(plan.num_slots(t)) for t in (0, 1, 3, 4, 5, 8)] == [
        7, 8, 8, 10, 11, 13]
    assert [plan.num_blocks(t) for t in (0, 1, 4, 5)] == [3, 3, 4, 4]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_slots_in_use_always_form_a_prefix(seed, block_size):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (3, 5), generator=gen)
    plan = PagePlan(counts, block_size)
    for appended in (0, 1, 2, 7, 16, 33):
        for pool in range(3):
            slots = set()
            for head in range(5):
                total = int(counts[pool, head]) + appended
                pages = {_pool_slot(plan, pool, head, i)
                         for i in range(0, total, 1)}
                # a head's tokens fill its pages in order, block_size a page
                assert len(pages) == cdiv(total, block_size)
                assert not pages & slots  # no page shared between heads
                slots |= pages
            assert slots == set(range(int(plan.num_slots(appended)[pool])))
        assert plan.num_blocks(appended) == int(
            cdiv(plan.num_slots(appended), 5).max())
    # every count at once (a new prompt length's phase) agrees, pages
    # counted above head by head
    many = torch.tensor([0, 1, 2, 7, 16, 33, 50])
    assert plan.num_blocks_many(many).tolist() == [
        plan.num_blocks(int(a)) for a in many]


def _pool_slot(plan, pool, head, index):
    return int(plan.slots(torch.tensor(pool), torch.tensor(head),
                          torch.tensor(index)))


@pytest.mark.parametrize("prompt_len, budget, tokens_per_head, max_layer", [
    (2880, 256, 254.890625, 680.0),
    (2880, 64, 74.4375, 145.5),
    (1200, 256, 207.40625, 441.0),
])
def test_design_memory_table(prompt_len, budget, tokens_per_head, max_layer):
    """DESIGN section 2: exact pages vs max-over-layers, Vicuna scores, block 16."""
    kept = kept_counts(head_budgets(load_head_scores(VICUNA), 32, budget),
                       prompt_len, budget)
    pages = cdiv(kept, 16)
    assert int(pages.sum()) * 16 / 1024 == tokens_per_head
    assert int(pages.sum(1).max()) * 16 / 32 == max_layer
    # one pool for all layers: within one block of the exact page count
    exact = PagePlan(kept.view(1, -1), 16).num_blocks(0)
    assert exact == cdiv(int(pages.sum()), 1024)
    # one pool per layer: the maximum over layers
    assert PagePlan(kept, 16).num_blocks(0) == cdiv(int(pages.sum(1).max()), 32)


def test_vicuna_2880_at_256_holds_11x_fewer_blocks():
    """DESIGN section 2's headline: 180 full-cache blocks against 16, the
    exact page count rounded up to whole blocks of 1,024 pages."""
    kept = kept_counts(head_budgets(load_head_scores(VICUNA), 32, 256), 2880,
                       256)
    compressed = PagePlan(kept.view(1, -1), 16).num_blocks(0)
    assert compressed == 16
    assert cdiv(2880, 16) // compressed == 11


def _standard_cache(space, blocks, prompt_len, width, gen):
    """A layer-major paged buffer whose request rows hold a known value per token."""
    rows = torch.randn(space.num_layers * space.num_blocks * space.num_kv_heads *
                       space.block_size, width, generator=gen)
    truth = torch.randn(space.num_layers, space.num_kv_heads, prompt_len, width,
                        generator=gen)
    for layer in range(space.num_layers):
        for head in range(space.num_kv_heads):
            for pos in range(prompt_len):
                block = int(blocks[pos // space.block_size])
                row = (space.page_id(layer, block, head) * space.block_size +
                       pos % space.block_size)
                rows[row] = truth[layer, head, pos]
    return rows, truth


@pytest.mark.parametrize("pools", ["cross-layer", "per-layer"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_compaction_append_and_attention_round_trip(pools, block_size):
    gen = torch.Generator().manual_seed(block_size)
    num_layers, num_kv_heads, group, dim = 3, 2, 2, 8
    prompt_len, window, budget = 61, 4, 12
    space = PageSpace(num_layers, num_blocks=40, num_kv_heads=num_kv_heads,
                      block_size=block_size)
    order = torch.randperm(39, generator=gen) + 1
    prompt_blocks = order[:cdiv(prompt_len, block_size)]
    rows, truth = _standard_cache(space, prompt_blocks, prompt_len, 2 * dim, gen)
    before = rows.clone()

    caps = head_budgets(torch.rand(num_layers, num_kv_heads * group,
                                   generator=gen), num_kv_heads, budget, window)
    selected = [select_kept(torch.rand(num_kv_heads, prompt_len - window,
                                       generator=gen), caps[l], window)
                for l in range(num_layers)]
    width = max(int(p.shape[1]) for p, _ in selected)
    positions = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[1]),
                                                     value=-1)
                             for p, _ in selected])
    counts = torch.stack([c for _, c in selected])
    assert torch.equal(counts, kept_counts(caps, prompt_len, budget, window))

    num_pools = 1 if pools == "cross-layer" else num_layers
    layout = RequestLayout(space, counts, num_pools, prompt_blocks)
    kept_blocks = layout.plan.num_blocks(0)
    assert kept_blocks < len(prompt_blocks)
    # out of place: fresh blocks, none of them a prompt block
    layout.blocks = order[len(prompt_blocks):len(prompt_blocks) + kept_blocks]
    src, dst = compaction_rows(layout, prompt_blocks, positions, counts)
    copy_rows_reference(rows, src, dst)

    # every kept token is where the layout says; rows outside the fresh
    # blocks, the prompt's among them (a prefix cache reads them), untouched
    untouched = torch.ones(rows.shape[0], dtype=torch.bool)
    for layer in range(num_layers):
        for block in layout.blocks.tolist():
            for head in range(num_kv_heads):
                page = space.page_id(layer, block, head)
                untouched[page * block_size:(page + 1) * block_size] = False
    assert torch.equal(rows[untouched], before[untouched])
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            index = torch.arange(int(counts[layer, head]))
            got = rows[layout.token_rows(torch.tensor(layer), torch.tensor(head),
                                         index)]
            want = truth[layer, head, positions[layer, head, :len(index)]]
            assert torch.equal(got, want)
    # destinations stay inside the blocks the request keeps
    kept_pages = {space.page_id(l, int(b), h) for l in range(num_layers)
                  for b in layout.blocks for h in range(num_kv_heads)}
    assert {int(r) // block_size for r in dst} <= kept_pages

    # decode: append tokens, growing the block list by the plan's law
    free = order[len(prompt_blocks) + kept_blocks:].tolist()
    appended = torch.randn(num_layers, num_kv_heads, 2 * block_size + 3, 2 * dim,
                           generator=gen)
    for t in range(appended.shape[2]):
        need = layout.plan.num_blocks(t + 1)
        while len(layout.blocks) < need:
            layout.blocks = torch.cat([layout.blocks, torch.tensor([free.pop()])])
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                row = layout.token_rows(torch.tensor(layer), torch.tensor(head),
                                        counts[layer, head] + t)
                write_rows(rows, row.view(1), appended[layer, head, t][None])
    assert len(layout.blocks) == layout.plan.num_blocks(appended.shape[2])

    # page-list attention equals dense attention over each head's tokens
    pages = rows.view(-1, block_size, 2 * dim)
    for layer in range(num_layers):
        lengths = counts[layer] + appended.shape[2]
        table = layout.page_table(layer, lengths)
        query = torch.randn(num_kv_heads, group, dim, generator=gen)
        got = paged_attention_reference(
            query, pages[..., :dim], pages[..., dim:], table, lengths,
            torch.arange(num_kv_heads + 1), scale=dim**-0.5)
        for head in range(num_kv_heads):
            tokens = torch.cat([
                truth[layer, head, positions[layer, head, :counts[layer, head]]],
                appended[layer, head]])
            probs = torch.softmax(query[head] @ tokens[:, :dim].T * dim**-0.5, -1)
            torch.testing.assert_close(got[head], probs @ tokens[:, dim:])


def test_page_list_attention_is_causal_bottom_right():
    gen = torch.Generator().manual_seed(0)
    pages = torch.randn(6, 4, 2, 8, generator=gen)
    table = torch.tensor([[3, 1, 5], [0, 2, 0]])
    seq_lens = torch.tensor([10, 5])
    query = torch.randn(5, 2, 8, generator=gen)  # 3 queries, then 2
    starts = torch.tensor([0, 3, 5])
    got = paged_attention_reference(query, pages[:, :, 0], pages[:, :, 1], table,
                                    seq_lens, starts, scale=0.5)
    for seq, (lo, hi) in enumerate([(0, 3), (3, 5)]):
        n = int(seq_lens[seq])
        keys = pages[table[seq]].reshape(-1, 2, 8)[:n]
        for i in range(hi - lo):
            visible = n - (hi - lo) + i + 1
            probs = torch.softmax(query[lo + i] @ keys[:visible, 0].T * 0.5, -1)
            torch.testing.assert_close(got[lo + i], probs @ keys[:visible, 1])


def test_copy_rows_writes_only_its_destinations():
    rows = torch.arange(12.0).view(6, 2)
    copy_rows_reference(rows, torch.tensor([1, 2]), torch.tensor([5, 0]))
    assert rows.tolist() == [[4, 5], [2, 3], [4, 5], [6, 7], [8, 9], [2, 3]]
