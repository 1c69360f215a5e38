"""Window scores and kept positions: hand-worked cases, an independent loop, chunking."""

import math

import pytest
import torch

from vllm_sparsemm.core.selection import (WindowQueryBuffer, kept_positions,
                                          select_kept, window_scores)


def _keys(*values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


def test_softmax_mean_and_pooling_by_hand():
    # One head, D = 1, W = 1: the window query (q = 1) at position 3 sees all
    # four keys; logits [0, ln 2, ln 4, 0] -> probs [1, 2, 4, 1] / 8.
    keys = _keys(0.0, math.log(2), math.log(4), 0.0)
    query = torch.ones(1, 1, 1)
    plain = window_scores(query, keys, pool_kernel=1)
    torch.testing.assert_close(plain, torch.tensor([[0.125, 0.25, 0.5]]))
    # kernel 3, zero padding counted: [(0+.125+.25)/3, (.125+.25+.5)/3, (.25+.5+0)/3]
    pooled = window_scores(query, keys, pool_kernel=3)
    torch.testing.assert_close(pooled, torch.tensor([[0.375, 0.875, 0.75]]) / 3)


def test_gqa_takes_the_mean_of_the_group():
    # Two query heads on one KV head: head 0 as above, head 1 (q = 0) uniform.
    keys = _keys(0.0, math.log(2), math.log(4), 0.0)
    query = torch.tensor([[[1.0], [0.0]]])  # [W=1, Hq=2, D=1]
    scores = window_scores(query, keys, pool_kernel=1)
    torch.testing.assert_close(scores, torch.tensor([[0.1875, 0.25, 0.375]]))


def test_window_queries_are_causal():
    # W = 2, N = 4, uniform queries: position 2 sees keys 0-2 (1/3 each),
    # position 3 sees all four (1/4 each); keys 0, 1 score (1/3 + 1/4) / 2.
    keys = _keys(1.0, 2.0, 3.0, 4.0)
    scores = window_scores(torch.zeros(2, 1, 1), keys, pool_kernel=1)
    torch.testing.assert_close(scores, torch.full((1, 2), 7 / 24))


def test_three_heads_by_hand():
    # N = 6, W = 2: scored keys 0-3, window keys 4-5 always kept.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6],    # cap 0: window only
                           [0.1, 0.4, 0.3, 0.2],    # cap 1: key 1
                           [0.5, 0.1, 0.5, 0.2]])   # cap 2: the tie 0/2
    positions, counts = select_kept(scores, torch.tensor([0, 1, 2]), window=2)
    assert counts.tolist() == [2, 3, 4]
    assert positions.tolist() == [[4, 5, -1, -1], [1, 4, 5, -1], [0, 2, 4, 5]]
    # a tie at the cut goes to the earlier position
    positions, _ = select_kept(scores[2:], torch.tensor([1]), window=2)
    assert positions.tolist() == [[0, 4, 5]]


def test_cap_above_the_prompt_keeps_everything():
    positions, counts = select_kept(torch.rand(2, 5), torch.tensor([9, 5]), 3)
    assert counts.tolist() == [8, 8]
    assert positions.tolist() == [list(range(8))] * 2


def _loop_window_scores(queries, keys, pool_kernel):
    """The DESIGN's steps written out one head and one query at a time."""
    window, num_heads, dim = queries.shape
    num_keys, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(num_kv_heads, num_keys - window, dtype=torch.float64)
    for kv_head in range(num_kv_heads):
        mean = torch.zeros(num_keys - window, dtype=torch.float64)
        for head in range(kv_head * group, (kv_head + 1) * group):
            for i in range(window):
                visible = num_keys - window + i + 1
                logits = (keys[:visible, kv_head].double() @
                          queries[i, head].double()) / math.sqrt(dim)
                mean += torch.softmax(logits, 0)[:num_keys - window]
        mean /= window * group
        pad = pool_kernel // 2
        padded = torch.cat([torch.zeros(pad, dtype=torch.float64), mean,
                            torch.zeros(pad, dtype=torch.float64)])
        out[kv_head] = padded.unfold(0, pool_kernel, 1).sum(-1) / pool_kernel
    return out


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2), (7, 1)])
def test_matches_an_independent_loop(num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_heads)
    queries = torch.randn(8, num_heads, 16, generator=gen)
    keys = torch.randn(40, num_kv_heads, 16, generator=gen)
    got = window_scores(queries, keys, pool_kernel=5)
    # float32 against a float64 loop: scores are probabilities of ~1/40, so
    # 1e-7 absolute is a few float32 ulps, and 1e-5 relative covers the
    # larger ones; a wrong mask or mean is off by far more
    torch.testing.assert_close(got.double(), _loop_window_scores(queries, keys, 5),
                               rtol=1e-5, atol=1e-7)


def test_half_precision_inputs_are_scored_in_float32():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(4, 2, 8, generator=gen).half()
    keys = torch.randn(20, 2, 8, generator=gen).half()
    got = window_scores(queries, keys)
    assert got.dtype == torch.float32
    # the half inputs are upcast first, so the two are the same float32 maths
    assert torch.equal(got, window_scores(queries.float(), keys.float()))


@pytest.mark.parametrize("chunk", [1, 3, 7, 32, 100])
def test_chunked_window_equals_one_shot(chunk):
    gen = torch.Generator().manual_seed(chunk)
    prompt_len, window = 50, 16
    queries = torch.randn(prompt_len, 4, 8, generator=gen)
    keys = torch.randn(prompt_len, 2, 8, generator=gen)
    buffer = WindowQueryBuffer(prompt_len, window)
    for start in range(0, prompt_len, chunk):
        assert not buffer.complete
        buffer.add(start, queries[start:start + chunk])
    assert buffer.complete
    one_shot = window_scores(queries[-window:], keys)
    assert torch.equal(buffer.scores(keys), one_shot)


def test_incomplete_window_is_an_error():
    buffer = WindowQueryBuffer(prompt_len=10, window=4)
    buffer.add(0, torch.randn(8, 1, 2))
    with pytest.raises(RuntimeError, match=r"positions \[8, 9\] never arrived"):
        buffer.scores(torch.randn(10, 1, 2))


def test_kept_positions_counts_follow_the_caps():
    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(4, 4, 8, generator=gen)
    keys = torch.randn(30, 2, 8, generator=gen)
    positions, counts = kept_positions(queries, keys, torch.tensor([3, 100]))
    assert counts.tolist() == [7, 30]
    assert positions[0, :7].tolist()[-4:] == [26, 27, 28, 29]
    assert positions[1].tolist() == list(range(30))


@pytest.mark.parametrize("args, message", [
    ((torch.randn(4, 3, 8), torch.randn(10, 2, 8)), "do not fit"),
    ((torch.randn(10, 2, 8), torch.randn(10, 2, 8)), "window"),
])
def test_bad_shapes_are_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        window_scores(*args)
    with pytest.raises(ValueError, match="odd"):
        window_scores(torch.randn(2, 2, 8), torch.randn(10, 2, 8), pool_kernel=4)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2)])
def test_prompts_of_different_lengths_select_as_alone(num_heads, num_kv_heads):
    """One batch of prompts of several lengths, padded to the longest (the
    padding's keys arbitrary): every prompt's scores and kept positions are
    those it gets scored alone."""
    gen = torch.Generator().manual_seed(3)
    window, dim, lengths = 6, 16, [9, 30, 17, 30, 23]
    longest = max(lengths)
    queries = torch.randn(len(lengths), window, num_heads, dim, generator=gen)
    keys = torch.randn(len(lengths), longest, num_kv_heads, dim,
                       generator=gen)
    caps = torch.randint(0, 20, (len(lengths), num_kv_heads), generator=gen)
    ragged = torch.tensor(lengths)
    # each prompt's window queries sit at its own end
    scores = window_scores(queries, keys, 5, lengths=ragged)
    assert scores.shape == (len(lengths), num_kv_heads, longest - window)
    counts_alone = [torch.clamp(caps[b], max=n - window) + window
                    for b, n in enumerate(lengths)]
    width = int(max(c.max() for c in counts_alone))
    kept, counts = select_kept(
        scores.flatten(0, 1), caps.flatten(), window, max_count=width,
        lengths=(ragged - window).repeat_interleave(num_kv_heads))
    kept = kept.view(len(lengths), num_kv_heads, width)
    counts = counts.view(len(lengths), num_kv_heads)
    for b, n in enumerate(lengths):
        alone = window_scores(queries[b], keys[b, :n], 5)
        torch.testing.assert_close(scores[b, :, :n - window], alone,
                                   rtol=1e-5, atol=1e-7)
        # past its prompt only the pooling's spill (select_kept drops it)
        assert not scores[b, :, n - window + 2:].any()
        positions, count = select_kept(alone, caps[b], window)
        assert torch.equal(counts[b], count)
        assert torch.equal(kept[b, :, :positions.shape[1]], positions)
        assert bool((kept[b, :, positions.shape[1]:] == -1).all())
