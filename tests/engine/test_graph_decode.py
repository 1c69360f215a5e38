"""The fixed decode path that full CUDA graphs replay (graph_decode.py), on CPU:
the same outputs as dense SparseMM with compressed, uncompressed and padded
rows in one step, buffers that keep their addresses, padding that writes only
into the null block, and the patch that keeps FULL graphs off prompt steps."""

import types

import numpy as np
import pytest

import torch

from cpu_engine import BS, DIM, HEADS, KV_HEADS, Engine, attention_layer
from vllm_sparsemm.engine import patches
from vllm_sparsemm.engine.graph_decode import GraphDecode
from vllm_sparsemm.engine.step_rows import RowInfo, StepRows

# a and c are compressed (prompt > budget), b is not
PROMPTS = {"a": 100, "b": 30, "c": 71}


def _prefilled(decode=6, tp=1):
    eng = Engine(full_graphs=True, tp=tp)
    plans = eng.add_all(PROMPTS, 64, decode)
    while any(len(p) > decode for p in plans.values()):
        schedule = {rid: plan.pop(0) for rid, plan in plans.items()
                    if len(plan) > decode}
        tokens, outputs = eng.step(schedule)
        assert eng.last_plan is None or eng.last_plan.compressed is None or (
            eng.last_plan.compressed.max_length != 4096)  # not the graph path
        eng.processed(schedule)
        eng.check(tokens, outputs)
    return eng


@pytest.mark.parametrize("pad_to, tp", [(0, 1), (5, 1), (8, 1), (5, 2)])
def test_uniform_decode_on_the_fixed_path_matches_dense_sparsemm(pad_to, tp):
    eng = _prefilled(tp=tp)
    for _ in range(6):
        schedule = {rid: 1 for rid in PROMPTS}
        tokens, outputs = eng.step(schedule, pad_to=pad_to)
        compressed = eng.last_plan.compressed
        assert compressed.max_length == 4096  # the fixed path ran
        assert len(compressed.rows) == max(pad_to, len(PROMPTS))
        assert not eng.last_plan.standard_rows
        eng.processed(schedule)
        eng.check(tokens, outputs)


def test_fixed_path_buffers_keep_their_addresses_across_steps():
    eng = _prefilled()

    def addresses():
        cr = eng.last_plan.compressed
        return [t.data_ptr() for t in (
            cr.write_rows, cr.lengths, cr.prefix_pages, cr.decode_base,
            cr.prompt_entries, cr.virtual_starts)]

    eng.step({rid: 1 for rid in PROMPTS}, pad_to=8)
    first = addresses()
    eng.processed(PROMPTS)
    eng.step({"a": 1, "c": 1}, pad_to=8)  # other rows, same padded size
    assert addresses() == first


def test_padded_rows_write_into_the_null_block_and_read_nothing():
    eng = _prefilled()
    eng.step({rid: 1 for rid in PROMPTS}, pad_to=7)
    state, cr = eng.state, eng.last_plan.compressed
    heads = state.num_kv_heads
    pages_per_block = state.space.pages_per_block
    padded = slice(len(PROMPTS) * heads, 7 * heads)
    for layer in range(state.num_layers):
        blocks = cr.write_rows[layer, padded] // BS // pages_per_block
        assert blocks.eq(0).all()  # block 0: vLLM's null block
        assert cr.lengths[layer, padded].eq(0).all()
        real = cr.write_rows[layer, :len(PROMPTS) * heads] // BS
        assert (real // pages_per_block).ne(0).all()


def test_a_full_step_that_is_not_a_uniform_decode_fails_loudly():
    graph = GraphDecode(4096, 8)
    decoding = [RowInfo("a", prompt_len=100, computed=120, scheduled=1)]
    in_prompt = [RowInfo("a", prompt_len=100, computed=99, scheduled=1)]
    graph.check_uniform_decode(decoding, 4, 4)
    graph.check_uniform_decode(StepRows.of(decoding), 4, 4)  # as vLLM stashes
    graph.check_uniform_decode(None, 4, 4)  # vLLM's dummy and capture runs
    for bad in [(in_prompt, 4, 4),  # would skip window queries, compaction
                (decoding, 2, 5),  # a prefill chunk
                (decoding, 9, 9)]:  # beyond the buffers
        with pytest.raises(RuntimeError, match="not a uniform decode"):
            graph.check_uniform_decode(*bad)


def test_dispatch_rules_full_out_for_prompt_rows_and_tells_the_builder():
    from vllm.config import CUDAGraphMode
    seen = []

    def original(self, **kwargs):  # vLLM: FULL for uniform decode unless
        seen.append(kwargs["use_cascade_attn"])  # cascade attention is on
        mode = (CUDAGraphMode.PIECEWISE if kwargs["use_cascade_attn"] else
                CUDAGraphMode.FULL)
        return mode, None, False, None, None

    wrapped = _dispatch(original)
    runner = types.SimpleNamespace(
        _sparsemm_full_graphs=True, input_batch=types.SimpleNamespace(
            num_computed_tokens_cpu=np.array([120, 99, 0]),
            num_prompt_tokens=np.array([100, 100, 50])))
    args = dict(num_tokens=2, num_reqs=2, num_scheduled_tokens_np=None,
                max_num_scheduled_tokens=1, use_cascade_attn=False)
    full = []
    for call in [args,  # row 1 computes its last prompt token
                 dict(args, num_reqs=1),  # only a decoding row
                 dict(args, force_uniform_decode=True)]:  # capture run
        wrapped(runner, **call)
        full.append(runner._sparsemm_step_full_graph)
    runner._sparsemm_full_graphs = False
    wrapped(runner, **args)
    full.append(runner._sparsemm_step_full_graph)
    assert seen == [True, False, False, False]
    assert full == [False, True, True, False]


def _dispatch(original):
    """patches.patch_full_graph_dispatch's wrapper around ``original``."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    saved = GPUModelRunner.__dict__["_determine_batch_execution_and_padding"]
    key = (id(GPUModelRunner), "_determine_batch_execution_and_padding")
    try:
        GPUModelRunner._determine_batch_execution_and_padding = original
        patches._patched.discard(key)
        patches.patch_full_graph_dispatch()
        return GPUModelRunner.__dict__["_determine_batch_execution_and_padding"]
    finally:
        GPUModelRunner._determine_batch_execution_and_padding = saved
        patches._patched.add(key)


def test_builder_declares_full_graphs_for_uniform_decode_unless_turned_off():
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_sparsemm.engine.backend import SparseMMMetadataBuilder
    default = types.SimpleNamespace(additional_config={})
    off = types.SimpleNamespace(
        additional_config={"sparsemm": {"full_cuda_graphs": False}})
    support = SparseMMMetadataBuilder.get_cudagraph_support
    assert support(default, None) == (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    assert support(off, None) == AttentionCGSupport.NEVER


def test_capture_run_binds_the_cache_before_any_forward_and_writes_block_0():
    """vLLM captures full graphs (rows None, all padding) before any layer
    has run: the builder binds the buffer from the forward context first."""
    from vllm_sparsemm.engine import backend
    eng = Engine(full_graphs=True)
    state, rank = eng.state, eng.ranks[0]
    assert state.space is None
    rank.cache.normal_()
    before = rank.cache.clone()
    name = eng.layers[0].layer_name
    config = types.SimpleNamespace(compilation_config=types.SimpleNamespace(
        static_forward_context={name: types.SimpleNamespace(
            kv_cache=rank.cache[:, 0])}))
    backend.bind_before_first_forward(state, config, name)
    assert state.pages.data_ptr() == rank.cache.data_ptr()
    reqs = 4
    metadata = types.SimpleNamespace(block_table=torch.zeros(
        reqs, 3, dtype=torch.int32), sparsemm_state=state,
        slot_mapping=torch.zeros(reqs, dtype=torch.int64))
    plan = backend.step_plan(state, None, reqs, reqs,
                             torch.arange(reqs + 1), metadata, full_graph=True)
    # every row of a FULL step is compressed: vLLM's own write skips them all
    assert metadata.slot_mapping.eq(-1).all()
    assert plan.compressed.max_length == 4096  # the fixed path
    metadata.sparsemm_step = plan
    for l, layer in enumerate(eng.layers):
        q = torch.zeros(reqs, HEADS, DIM)
        kv = torch.ones(reqs, KV_HEADS, DIM)
        out = torch.full_like(q, float("nan"))
        attention_layer(rank.impl, layer, q, kv, kv, rank.cache[:, l],
                        metadata, out)
        assert out.eq(0).all()  # no keys: nothing read
    assert torch.equal(rank.cache[1:], before[1:])  # only block 0 written
    assert not torch.equal(rank.cache[0], before[0])


def test_a_decoding_row_never_compacted_on_this_worker_fails_loudly():
    """Both step plans refuse a compressed row past its prompt whose
    request this worker never compacted (its pages would be garbage)."""
    from vllm_sparsemm.engine.step_plan import plan_step
    eng = _prefilled()
    rows = StepRows.of([RowInfo("ghost", prompt_len=100, computed=120,
                                scheduled=1)])
    table = torch.zeros(1, 16, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="ghost decodes but was never"):
        plan_step(eng.state, rows, [0, 1], table)
    with pytest.raises(RuntimeError, match="ghost decodes but was never"):
        eng.state.graph.rows(eng.state, rows, 1, table)
