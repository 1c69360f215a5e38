"""benchmarks/attention_bench.py's inputs: the stock and per-head layouts it
times must hold the same keys and values for every (row, KV head), or the
comparison would not be of the same attention."""

import pytest
import torch

from scripts import load_script


def _own_kv(case: dict, seq: int, length: int, dim: int):
    """Keys and values ``[length, D]`` of sequence ``seq`` (row * Hkv +
    head) as its own pages hold them."""
    own = case["pages"][case["table"][seq].long()]
    return (own[..., :dim].reshape(-1, dim)[:length],
            own[..., dim:].reshape(-1, dim)[:length])


def test_stock_blocks_and_per_head_pages_hold_the_same_kv():
    bench = load_script("attention_bench")
    rows, tokens, heads, dim, bs = 3, 37, 4, 8, 16
    case = bench.build_case(rows, tokens, heads, dim, bs, torch.device("cpu"),
                            group=3)
    pages, blocks = case["pages"], case["blocks"]
    width = -(-tokens // bs)
    assert case["table"].shape == (rows * heads, width)
    assert case["block_table"].shape == (rows, width)
    # every page and block is used once, and none is the null page 0
    assert sorted(case["table"].flatten().tolist()) == list(range(1, len(pages)))
    assert sorted(case["block_table"].flatten().tolist()) == list(
        range(1, blocks.shape[1]))
    for row in range(rows):
        for head in range(heads):
            keys, values = _own_kv(case, row * heads + head, tokens, dim)
            stock = blocks[:, case["block_table"][row].long(), :, head]
            assert torch.equal(keys, stock[0].reshape(-1, dim)[:tokens])
            assert torch.equal(values, stock[1].reshape(-1, dim)[:tokens])
    assert case["query"].shape == (rows, 3 * heads, dim)
    assert case["kv_bytes"] == 2 * rows * heads * tokens * dim * 2


def test_cases_parse_and_bad_ones_say_why():
    bench = load_script("attention_bench")
    assert bench.parse_cases("755x265, 26x300+2x2000") == [
        (755, 265, 0, 0), (26, 300, 2, 2000)]
    for bad in ("755", "x3", "7x", "ax3", "7x3+2", "7x3+x9"):
        with pytest.raises(SystemExit, match="ROWSxTOKENS"):
            bench.parse_cases(bad)


def test_a_lopsided_case_gives_its_long_heads_their_tokens():
    bench = load_script("attention_bench")
    rows, heads, dim, bs = 2, 4, 8, 16
    case = bench.build_case(rows, 5, heads, dim, bs, torch.device("cpu"),
                            long_heads=1, long_tokens=40)
    assert case["lengths"].tolist() == [40, 5, 5, 5] * rows
    assert case["longest"] == 40 and case["table"].shape == (rows * heads, 3)
    assert case["row_lengths"].tolist() == [40] * rows  # stock holds it all
    assert case["kv_bytes"] == 2 * rows * (40 + 3 * 5) * dim * 2


def test_host_time_counts_launches_not_the_wait(monkeypatch):
    import torch
    bench = load_script("attention_bench")
    waits, launches = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: waits.append(1))
    us = bench.host_time(lambda: launches.append(1), calls=50)
    # one warm call, then 50 timed; the device is waited for around them
    assert len(launches) == 51 and len(waits) == 2 and us > 0


def test_the_per_head_call_is_the_backends_attention():
    """The timed call drives the backend's own method (its CPU reference
    here), so a change to that method's signature breaks this test, not a
    GPU session."""
    bench = load_script("attention_bench")
    rows, heads, group, dim, bs = 2, 2, 3, 8, 16
    case = bench.build_case(rows, 21, heads, dim, bs, torch.device("cpu"),
                            group=group, long_heads=1, long_tokens=37)
    scale = dim ** -0.5
    got = bench.per_head_call(case, scale)()
    for row in range(rows):
        for head in range(heads):
            seq = row * heads + head
            keys, values = _own_kv(case, seq, int(case["lengths"][seq]), dim)
            for q in range(head * group, (head + 1) * group):
                query = case["query"][row, q].float()
                want = (torch.softmax(keys.float() @ query * scale, 0)
                        @ values.float())
                torch.testing.assert_close(got[row, q].float(), want,
                                           atol=2e-2, rtol=2e-2)
