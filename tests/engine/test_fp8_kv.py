"""``--kv-cache-dtype fp8`` on the CPU engine: the whole backend over an fp8
cache with per-layer scales, against dense SparseMM attention of the same
fp8-rounded queries, keys and values.

vLLM allocates the cache as bytes and quantizes queries in the attention
layer; the backend stores K/V divided by each layer's scale (as
``reshape_and_cache_flash``), selects on dequantized keys, and attends with
the scales as FlashAttention's descales. Each layer's scales differ from 1
and from each other's (``cpu_engine``), so a missed or misplaced one shows.
"""

import pytest
import torch

from cpu_engine import BUDGET, DIM, HEADS, KV_HEADS, LAYERS, Engine
from test_prefix_caching import _conversation
from vllm_sparsemm.engine.backend import SparseMMImpl
from vllm_sparsemm.engine.worker_state import WorkerKVState
from vllm_sparsemm.kernels.kv_ops import FP8_KV_DTYPE


@pytest.mark.parametrize("chunk", [13, 500])
def test_mixed_batch_over_fp8_matches_dense_sparsemm(chunk):
    eng = Engine(kv_cache_dtype="fp8")
    prompts = {"a": 100, "b": 30, "c": 71, "d": 49, "e": 71}
    plans = eng.add_all(prompts, chunk, 12, tail=[3])
    for _, tokens, outputs in eng.run(plans):
        eng.check(tokens, outputs)
    assert eng.state.pages.dtype == FP8_KV_DTYPE
    compressed = [rid for rid, p in prompts.items() if p > BUDGET]
    for rid in prompts:
        eng.finish(rid)
    assert compressed and eng.kv.block_pool.get_num_free_blocks() == (
        eng.free_at_start)


def test_fp8_selection_in_key_chunks_matches_dense_sparsemm(monkeypatch):
    """The streamed selection of prompts past a pass's token bound reads
    dequantized keys too."""
    from vllm_sparsemm.engine import layer_ops, step_plan
    monkeypatch.setattr(layer_ops, "SELECTION_TOKENS", 48)
    monkeypatch.setattr(step_plan, "SELECTION_TOKENS", 48)
    eng = Engine(kv_cache_dtype="fp8")
    plans = eng.add_all({"long": 150, "short": 45}, 64, 6)
    for _, tokens, outputs in eng.run(plans):
        eng.check(tokens, outputs)


def test_fp8_with_prefix_caching_and_full_graph_decode():
    """Shared prompts hit the cache (their fp8 blocks read back as they were
    written), and uniform decode steps on the full-graph path, padded."""
    _conversation(caching=True, kv_cache_dtype="fp8")
    eng = Engine(kv_cache_dtype="fp8", full_graphs=True)
    plans = eng.add_all({"a": 100, "b": 30, "c": 71}, 64, 3)
    for rid, plan in plans.items():
        plans[rid] = plan[:-3]
    for _ in eng.run(plans):
        pass
    for pad_to in (0, 5):
        schedule = {rid: 1 for rid in plans}
        tokens, outputs = eng.step(schedule, pad_to=pad_to)
        eng.processed(schedule)
        eng.check(tokens, outputs)
    assert eng.last_plan.compressed.max_length == eng.max_model_len


def test_fp8_cache_holds_what_the_layer_scales_say():
    """The bytes in the cache are K/V divided by the layer's scale: reading
    them with scale 1 instead would give other values (the check above
    could not tell a scale applied twice from once otherwise)."""
    eng = Engine(kv_cache_dtype="fp8")
    eng.add("a", 20, 21)
    eng.step({"a": 20})
    state, request = eng.state, eng.requests["a"]
    layer, position, head = 2, 5, 1
    block = int(eng.table.block_table.np[eng.row_of["a"], 0])
    page = state.space.page_id(layer, block, head)
    stored = state.pages[page, position, :8].float()
    scale = eng.layers[layer]._k_scale
    want = (request.k[layer, position, head] / scale).to(FP8_KV_DTYPE).float()
    assert torch.equal(stored, want)
    assert not torch.equal(stored, request.k[layer, position, head].to(
        FP8_KV_DTYPE).float())


def test_a_rebuilt_worker_state_adopts_the_scales_over_the_same_cache():
    """vLLM rebuilds its metadata builders, and so the worker state, after
    profiling; the KV cache may then sit at the freed buffer's address. The
    new state must still read every layer's scales, not keep its ones."""
    eng = Engine(kv_cache_dtype="fp8")
    cache = eng.ranks[0].cache
    impls = [SparseMMImpl(HEADS, DIM, DIM**-0.5, KV_HEADS, None, None, "fp8")
             for _ in eng.layers]  # one per layer, as vLLM builds them
    want = torch.stack([torch.stack([layer._k_scale, layer._v_scale,
                                     layer._q_scale]) for layer in eng.layers])
    for _ in range(2):
        state = WorkerKVState(eng.book, LAYERS, KV_HEADS, 0, False,
                              kv_fp8=True)
        for index, (impl, layer) in enumerate(zip(impls, eng.layers)):
            assert impl._layer_index(layer, cache[:, index], state) == index
        assert torch.equal(state.kv_scales, want)
