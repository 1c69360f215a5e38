"""The backend's whole logic on CPU, driven like vLLM drives it.

Scheduler side: vLLM's own ``KVCacheManager`` with our spec and manager.
Worker side: ``SparseMMImpl.forward`` for every layer of every step, over one
packed KV buffer, with the PyTorch references standing in for FlashAttention
and ``reshape_and_cache_flash``. Each request's queries, keys and values are
fixed random tensors per (layer, position), so the exact SparseMM attention of
every token can be computed densely and compared.
"""

import types

import numpy as np
import pytest
import torch

from cpu_engine import (BS, BUDGET, DIM, HEADS, KV_HEADS, LAYERS, WINDOW,
                        Engine, chunks)
from vllm_sparsemm.engine import backend
from vllm_sparsemm.engine.config import SparseMMSettings
from vllm_sparsemm.core.pages import cdiv


@pytest.mark.parametrize("chunk", [5, 13, 64, 500])
@pytest.mark.parametrize("async_frees", [False, True])
def test_mixed_batch_matches_dense_sparsemm(chunk, async_frees):
    _run_mixed_batch(chunk, async_frees)


def test_selection_in_chunks_across_requests_matches_dense_sparsemm(
        monkeypatch):
    """The selection scores (request, layer) pairs in chunks of at most
    SELECTION_TOKENS prompt tokens; chunks of 2-5 pairs cross requests."""
    from vllm_sparsemm.engine import layer_ops
    monkeypatch.setattr(layer_ops, "SELECTION_TOKENS", 250)
    _run_mixed_batch(500, False)


def test_decode_rows_past_compaction_skip_vllms_allocation(monkeypatch):
    """The mixed batch again, through vLLM's ``allocate_slots`` as the
    scheduler calls it for running requests: the decode steps of compacted
    requests skip vLLM's allocation (``SparseMMManager.slots_ready``) except
    where their lists grow, and attention stays exact."""
    from vllm_sparsemm.engine.kv_spec import SparseMMManager
    ready, answers = SparseMMManager.slots_ready, []

    def counted(self, *args):
        answers.append(ready(self, *args))
        return answers[-1]

    monkeypatch.setattr(SparseMMManager, "slots_ready", counted)
    _run_mixed_batch(64, True)
    assert sum(answers) >= 5 * 15  # five compacted requests, 20 steps each


def _run_mixed_batch(chunk, async_frees):
    eng = Engine()
    # b fits the budget; equal lengths (a, f and c, e) are selected as one batch
    prompts = {"a": 100, "b": 30, "c": 71, "d": 49, "e": 71, "f": 100}
    decode = 20
    plans = eng.add_all(prompts, chunk, decode)
    last, leading = {}, set()
    while any(plans.values()):
        schedule = {rid: plan.pop(0) for rid, plan in plans.items() if plan}
        pending = list(last.items()) if async_frees else []
        tokens, outputs = eng.step(schedule, pending)
        if not async_frees:
            eng.processed(schedule)
        last = schedule
        eng.check(tokens, outputs)
        cr = eng.last_plan and eng.last_plan.compressed
        if cr is not None:
            leading.add(cr.leading)
            assert (cr.virtual_token is None) == cr.leading
        for rid in schedule:
            request = eng.requests[rid]
            if eng.manager.prompt_released(rid):
                # once its prompt went back, a request holds exactly what
                # the block law says for the tokens allocated so far
                appended = request.num_computed_tokens - request.num_prompt_tokens
                assert eng.held_blocks(rid) == eng.law.compacted_blocks(
                    request.num_prompt_tokens, appended)
    # decode rows first are read as views; behind a prompt row, gathered
    assert leading == ({False} if chunk >= 100 else {True, False})
    for rid in prompts:
        request = eng.requests[rid]
        if BUDGET < request.num_prompt_tokens:
            assert eng.held_blocks(rid) == eng.law.compacted_blocks(
                request.num_prompt_tokens, decode)
            assert eng.held_blocks(rid) < cdiv(request.num_prompt_tokens + decode,
                                               BS)
        else:
            assert eng.held_blocks(rid) == cdiv(request.num_prompt_tokens + decode,
                                                BS)
        eng.finish(rid)
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start


def test_same_request_alone_and_in_a_batch_gives_the_same_output():
    def run(with_others):
        eng = Engine(seed=3)
        eng.add("x", 90, 110)
        if with_others:
            for i in range(6):
                eng.add(f"o{i}", 20 + 15 * i, 40 + 15 * i)
        plans = {rid: chunks(r.num_prompt_tokens, 32) + [1] * 20
                 for rid, r in eng.requests.items()}
        outs = []
        for _, tokens, outputs in eng.run(plans):
            outs += [outputs[:, t] for t, (rid, _) in enumerate(tokens)
                     if rid == "x"]
        return torch.stack(outs)

    # batch neighbours change the order of nothing but the reference's
    # float32 sums (see cpu_engine.Engine.check for the tolerance)
    torch.testing.assert_close(run(False), run(True), rtol=1e-5, atol=1e-5)


def test_preemption_recompute_and_abort_leak_nothing():
    eng = Engine()
    eng.add("p", 80, 160)
    eng.add("q", 60, 140)
    eng.add("gone", 70, 90)
    for schedule in ({"p": 40, "q": 40, "gone": 35},
                     {"p": 40, "q": 20, "gone": 30}):
        eng.step(schedule)
        eng.processed(schedule)
    eng.finish("gone")  # aborted mid-prefill
    for _ in range(20):
        tokens, outputs = eng.step({"p": 1, "q": 1})
        eng.check(tokens, outputs)
        eng.processed(("p", "q"))
    # preempt p by recompute: blocks freed, prompt + outputs re-prefilled;
    # the chunk that crosses the prompt ends past it (E > P), and the last
    # chunk runs several tokens at once on the compacted layout
    request = eng.requests["p"]
    done = request.num_computed_tokens
    eng.preempt("p")
    for chunk in (64, 30, done - 94):
        tokens, outputs = eng.step({"p": chunk, "q": 1} if chunk == 30
                                   else {"p": chunk})
        eng.processed(("p", "q"))
        eng.check(tokens, outputs)
    assert request.compaction_end == 94 > request.num_prompt_tokens
    assert done - 94 > 1
    for _ in range(20):
        tokens, outputs = eng.step({"p": 1, "q": 1})
        eng.check(tokens, outputs)
        eng.processed(("p", "q"))
    eng.finish("p")
    eng.finish("q")
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start
    assert eng.state.requests == {}


def test_one_prompt_length_with_and_without_a_recomputed_tail_compacts_apart():
    """Prompts of one length complete in one step; the one re-prefilling its
    outputs after a preemption (a tail past the prompt) is compacted apart."""
    eng = Engine()
    for rid in ("p", "r", "s"):
        eng.add(rid, 80, 120)

    def step(schedule):
        tokens, outputs = eng.step(schedule)
        eng.processed(schedule)
        eng.check(tokens, outputs)

    step({"p": 80})
    for _ in range(10):
        step({"p": 1})
    request = eng.requests["p"]
    done = request.num_computed_tokens
    eng.preempt("p")
    step({"p": done, "r": 80, "s": 80})
    assert request.compaction_end == done > 80
    for _ in range(5):
        step({"p": 1, "r": 1, "s": 1})
    for rid in ("p", "r", "s"):
        eng.finish(rid)
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start


def test_tensor_parallel_ranks_match_one_rank_and_share_the_max_block_count():
    """Two simulated ranks, each owning half the KV heads and its own cache."""
    results = {}
    for tp in (1, 2):
        eng = Engine(seed=4, tp=tp)
        prompts = {"a": 120, "b": 75, "c": 20}
        plans = eng.add_all(prompts, 50, 12)
        outs = []
        for _, tokens, outputs in eng.run(plans):
            eng.check(tokens, outputs)
            outs.append(outputs)
        held = {rid: eng.held_blocks(rid) for rid in prompts}
        # the scheduler gave what the law counts for all ranks at once
        assert held["a"] == eng.law.compacted_blocks(120, 12)
        results[tp] = (outs, held)
    # each rank sums its own heads: float32 order only (Engine.check)
    for one, two in zip(results[1][0], results[2][0]):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert results[2][1]["a"] >= results[1][1]["a"]


def test_selection_batches_split_by_length_and_token_cap():
    from vllm_sparsemm.engine import step_plan
    def req(n, budget=64):
        law = types.SimpleNamespace(plan=types.SimpleNamespace(budget=budget))
        return types.SimpleNamespace(prompt_len=n, law=law)

    # one budget and prompt length per group (row 6: another budget)
    compressing = [(i, req(n)) for i, n in
                   enumerate([100, 100, 100, 60, 300, 100])] + [(6, req(100,
                                                                     90))]
    groups = step_plan._selection_groups(compressing, 250)
    assert [(n, [i for i, _ in m]) for n, m in groups] == [
        (100, [0, 1]), (100, [2, 5]), (60, [3]), (300, [4]), (100, [6])]


def test_selection_batches_pad_lengths_up_to_the_token_cap():
    """Groups of any length and budget share batches, shortest first, with
    rows x longest <= the pass's token cap; each group's rows are
    contiguous, every request is in one batch once, and longer prompts in
    none."""
    from vllm_sparsemm.engine import step_plan
    state = types.SimpleNamespace(window=8, caps=lambda law: law.caps)

    def req(n, budget):
        law = types.SimpleNamespace(
            plan=types.SimpleNamespace(budget=budget),
            caps=torch.tensor([[budget, 20]]))
        return types.SimpleNamespace(prompt_len=n, law=law)

    lengths = [100, 30, 100, 60, 300, 30, 45, 100, 60]
    compressing = [(i, req(n, 40 if i % 3 else 90))
                   for i, n in enumerate(lengths)]
    groups = step_plan._selection_groups(compressing, 250)
    widths = [step_plan.kept_width(state, members[0][1].law, length)
              for length, members in groups]
    batches = step_plan._selection_batches(groups, widths, 250)
    seen = []
    for parts, longest, width in batches:
        rows = sum(hi - lo for _, lo, hi, _ in parts)
        assert rows * longest <= 250
        assert longest == max(groups[g][0] for g, _, _, _ in parts)
        assert width == max(min(groups[g][1][0][1].law.caps.max(),
                                groups[g][0] - 8) + 8 for g, _, _, _ in parts)
        first = 0
        for g, lo, hi, at in parts:
            assert at == first
            first += hi - lo
            seen += [i for i, _ in groups[g][1][lo:hi]]
    assert sorted(seen) == [i for i, n in enumerate(lengths) if n <= 250]
    assert [groups[g][0] for parts, _, _ in batches
            for g, _, _, _ in parts] == sorted(
                groups[g][0] for parts, _, _ in batches
                for g, _, _, _ in parts)


@pytest.mark.parametrize("selection_tokens, passes", [(1 << 15, [3]),
                                                      (2 * 7 * 122, [2, 1])])
def test_a_step_of_many_prompt_lengths_selects_in_few_passes(
        monkeypatch, selection_tokens, passes):
    """A chat load's prompts differ in length: they are scored together
    (not one batch per length), over as many layers at once as keep the
    padded tokens within SELECTION_TOKENS, and every output still equals
    dense SparseMM attention."""
    from vllm_sparsemm.engine import layer_ops, step_plan
    monkeypatch.setattr(step_plan, "SELECTION_TOKENS", selection_tokens)
    calls = []
    original = layer_ops.window_scores

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_ops, "window_scores", counted)
    eng = Engine(num_blocks=600)
    prompts = {f"r{n}": n for n in (BUDGET + 3, 57, 64, 71, 90, 121, 122)}
    plans = eng.add_all(prompts, 256, 5)  # every prompt in one step
    for step, (_, tokens, outputs) in enumerate(eng.run(plans)):
        eng.check(tokens, outputs)
        if step == 0:
            assert len(eng.last_plan.selection_batches) == 1
            assert len(eng.last_plan.selection_groups) == len(prompts)
    assert calls == [len(prompts) * layers for layers in passes]
    assert sum(passes) == LAYERS


def test_windows_in_the_step_are_gathered_and_split_ones_buffered():
    """A prompt whose whole observation window is in this step gives its
    window queries straight from the step's queries (no buffer); one whose
    window a chunk boundary split keeps its buffer. Both select as dense
    SparseMM says."""
    eng = Engine()
    # a: one step; b: its window (the last WINDOW tokens) split 3 / 5
    plans = {"a": [70, 1, 1], "b": [85 - 5, 5, 1]}
    eng.add("a", 70, 72)
    eng.add("b", 85, 86)
    seen = []
    for _, tokens, outputs in eng.run(plans):
        eng.check(tokens, outputs)
        plan = eng.last_plan
        seen.append([(batch.window_tokens is not None,
                      [req.prompt_len for req in batch.members])
                     for batch in plan.selection_batches])
        gathered = {id(req) for batch in plan.selection_batches
                    if batch.window_tokens is not None
                    for req in batch.members}
        assert not gathered & {id(req) for _, req in plan.window_rows}
    assert seen[0] == [(True, [70])]
    assert seen[1] == [(False, [85])]
    assert 85 - 5 > 85 - WINDOW  # b's first chunk held part of its window


def test_selection_host_work_does_not_grow_with_prompt_lengths(monkeypatch):
    """The tensor ops a step's selection issues (each a kernel launch on a
    GPU, where the host had to keep up) are the same for 16 prompts of one
    length and of 16 lengths; the CPU-only check against the block law is
    left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_sparsemm.engine import layer_ops
    monkeypatch.setattr(layer_ops, "_check_and_record_batch",
                        lambda *args: None)
    counted = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counted[0] += 1
            return func(*args, **(kwargs or {}))

    for name in ("select_layer", "collect_window_queries"):
        def wrapped(*args, _original=getattr(backend, name), **kwargs):
            with Count():
                return _original(*args, **kwargs)
        monkeypatch.setattr(backend, name, wrapped)
    ops = []
    for lengths in (1, 16):
        eng = Engine(num_blocks=1200, debug_poison=False)
        prompts = {f"r{i}": 60 + i % lengths for i in range(16)}
        for rid, prompt in prompts.items():
            eng.add(rid, prompt, prompt + 2)
        counted[0] = 0
        eng.step(prompts)
        ops.append(counted[0])
    assert ops[0] == ops[1] > 0


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 3, 1, 2]])
def test_virtual_sequences_list_each_row_head_token_once(query_lens):
    from vllm_sparsemm.engine.host_arrays import virtual_sequences
    heads = 3
    token, head, starts = virtual_sequences(query_lens, heads)
    expected, row_start = [], 0
    for n in query_lens:  # (row, head, token) order
        expected += [(row_start + t, h) for h in range(heads) for t in range(n)]
        row_start += n
    assert list(zip(token.tolist(), head.tolist())) == expected
    lens = [n for n in query_lens for _ in range(heads)]
    assert starts.tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    assert starts.dtype == np.int32


def test_memory_profile_run_reserves_the_selection_scratch(monkeypatch):
    """vLLM sizes the KV cache from the peak of its profile run, where
    attention gets no metadata: the selection's scratch must show there."""
    from vllm_sparsemm.engine import step_plan as worker_state
    seen = []
    monkeypatch.setattr(backend, "reserve_selection_scratch",
                        lambda nbytes, device: seen.append(nbytes))
    impl = backend.SparseMMImpl(HEADS, DIM, DIM**-0.5, KV_HEADS, None, None,
                                "auto")
    out = torch.ones(3, HEADS, DIM)
    impl.forward(None, out, out, out, None, None, out)
    assert out.eq(0).all()
    assert seen == [worker_state.selection_scratch_bytes(
        KV_HEADS, DIM, HEADS // KV_HEADS, SparseMMSettings().window)]
    # a 7B model (32 KV heads of 128, no GQA, W = 32): ~1.5 GB with the
    # window queries a pass over several layers holds
    assert 1.4e9 < worker_state.selection_scratch_bytes(32, 128, 1, 32) < 1.6e9


def test_triton_decode_kernel_is_refused_without_triton(monkeypatch):
    """``decode_kernel: "triton"`` is taken up by the attention layers, and
    fails at start-up, not silently, where Triton is missing on a CUDA
    machine; without CUDA the kernel never runs, so nothing is refused."""
    from vllm_sparsemm.kernels import triton_ops
    monkeypatch.setenv("VLLM_SPARSEMM_DECODE_KERNEL", "triton")
    impl = backend.SparseMMImpl(HEADS, DIM, DIM**-0.5, KV_HEADS, None, None,
                                "auto")
    assert impl.decode_kernel == "triton"
    monkeypatch.setattr(triton_ops, "AVAILABLE", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend.SparseMMImpl(HEADS, DIM, DIM**-0.5, KV_HEADS, None, None, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="needs Triton"):
        backend.SparseMMImpl(HEADS, DIM, DIM**-0.5, KV_HEADS, None, None,
                             "auto")


def test_prompts_past_the_selection_chunk_are_scored_in_key_chunks(
        monkeypatch):
    """A prompt longer than SELECTION_TOKENS is scored alone, its keys read a
    chunk at a time (bounded scratch whatever its length): every output
    still equals dense SparseMM attention."""
    from vllm_sparsemm.engine import layer_ops, step_plan
    from vllm_sparsemm.core import selection
    monkeypatch.setattr(layer_ops, "SELECTION_TOKENS", 48)
    monkeypatch.setattr(step_plan, "SELECTION_TOKENS", 48)
    streamed = []
    original = selection.streamed_window_scores

    def counted(*args, **kwargs):
        streamed.append(args[2])  # the prompt length
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_ops, "streamed_window_scores", counted)
    eng = Engine()
    plans = eng.add_all({"long": 150, "short": 45}, 64, 6)
    for _, tokens, outputs in eng.run(plans):
        eng.check(tokens, outputs)
    assert set(streamed) == {150}  # every layer of the long prompt alone


def test_the_kernel_scores_more_tokens_a_pass_in_the_same_scratch():
    """Reading keys in place (triton_ops.window_means) costs a pass far less
    scratch per token than the reference: the same reservation then covers
    more prompt tokens a pass, so a step runs fewer passes. LLaVA-1.5
    (MHA, D 128) and Qwen2-VL (G 7) shapes."""
    from vllm_sparsemm.engine import step_plan
    for heads, dim, group in ((32, 128, 1), (4, 128, 7)):
        tokens = step_plan.kernel_selection_tokens(heads, dim, group, 32)
        assert tokens > 2 * step_plan.SELECTION_TOKENS
        assert tokens * heads * (64 + 2 * group * dim) <= \
            step_plan.selection_scratch_bytes(heads, dim, group, 32)
        assert step_plan._layers_per_pass(20, 613, 32, tokens) > \
            step_plan._layers_per_pass(20, 613, 32,
                                       step_plan.SELECTION_TOKENS)


def test_compaction_time_spans_only_the_layers_that_select(monkeypatch):
    """A step's prompts select in passes over several layers, so most layers
    do no selection: only the layers that do are timed for /metrics (two
    device events a layer otherwise), and the step's time is still one
    reading, once the compaction in the last layer is done."""
    from cpu_engine import LAYERS
    eng = Engine()
    spans = []
    timer = eng.state.timer
    start = timer.start
    monkeypatch.setattr(timer, "start",
                        lambda device: spans.append(1) or start(device))
    plans = eng.add_all({"a": 100, "c": 71}, 500, 2)
    schedule = {rid: plan.pop(0) for rid, plan in plans.items()}
    tokens, outputs = eng.step(schedule)
    eng.check(tokens, outputs)
    batch, = eng.last_plan.selection_batches
    assert batch.layers_per_pass == LAYERS  # one pass, in the last layer
    assert len(spans) == 1
    assert len(timer.collect()) == 1


@pytest.mark.parametrize("capturing", [False, True])
def test_a_warm_up_run_builds_the_selection_kernels_once(monkeypatch,
                                                         capturing):
    """The window kernels are built in vLLM's warm-up forwards (a step with
    no compressed request), with the dtypes and strides of a selection pass,
    not by the first compressed prompt after vLLM's JIT monitor is on; never
    while a CUDA graph is captured, and once per state."""
    from vllm_sparsemm.engine import layer_ops
    from vllm_sparsemm.kernels import triton_ops
    calls = []

    def window_means(queries, rows, blocks, lengths, first_layer,
                     num_layers, num_kv_heads, block_size, longest,
                     scales=None):
        calls.append(dict(queries=queries, rows=rows, blocks=blocks,
                          lengths=lengths, first=first_layer,
                          layers=num_layers, heads=num_kv_heads,
                          block_size=block_size, longest=longest))
        return torch.zeros(len(queries), num_kv_heads, longest - WINDOW)

    monkeypatch.setattr(triton_ops, "runs_on", lambda where: True)
    monkeypatch.setattr(triton_ops, "window_means", window_means)
    monkeypatch.setattr(layer_ops, "capturing_graph",
                        lambda tensor: capturing)
    eng = Engine()
    eng.add("short", BUDGET - 10, BUDGET)  # never compressed: plain steps
    for n in chunks(BUDGET - 10, 10) + [1]:
        eng.step({"short": n})
        assert eng.last_plan is None  # vLLM's plain path, as in warm-ups
    if capturing:
        assert not calls and not eng.state.window_kernels_warm
        return
    call, = calls
    assert call["queries"].shape == (1, WINDOW, HEADS, DIM)
    assert call["queries"].is_contiguous()
    # a block-table row as a selection pass gathers it, block 0 only
    assert call["blocks"].shape == (1, eng.width)
    assert call["blocks"].stride() == (eng.width, 1)
    assert call["blocks"].dtype == torch.int32 and not call["blocks"].any()
    assert call["lengths"].dtype == torch.int64
    assert call["lengths"].tolist() == [WINDOW + 1]
    assert call["rows"].data_ptr() == eng.state.rows.data_ptr()
    assert (call["first"], call["layers"], call["heads"], call["longest"],
            call["block_size"]) == (0, LAYERS, KV_HEADS, WINDOW + 1, BS)
    assert eng.state.window_kernels_warm


def test_standard_rows_get_fa3s_schedule_of_their_own_rows(monkeypatch):
    """Where stock's build made FA3's ahead-of-time schedule, the standard
    rows get one of their own rows (else FA3 plans them in every layer),
    with the arguments stock's build passes (names checked against FA3's
    ``get_scheduler_metadata``); where it made none (FA2), none."""
    import inspect

    from vllm.platforms import current_platform
    from vllm.v1.attention.backends import flash_attn as fa
    from vllm.vllm_flash_attn.flash_attn_interface import (
        get_scheduler_metadata)
    calls = []
    monkeypatch.setattr(fa, "get_scheduler_metadata",
                        lambda **kw: calls.append(kw) or "rows' schedule",
                        raising=False)
    builder = types.SimpleNamespace(
        cache_config=types.SimpleNamespace(cache_dtype="auto"),
        kv_cache_dtype=torch.float16, num_heads_q=8, dcp_world_size=1,
        num_heads_kv=2, headdim=64, block_size=16,
        aot_sliding_window=(-1, -1))
    standard = types.SimpleNamespace(
        seq_lens=torch.tensor([700, 90], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 640, 648], dtype=torch.int32),
        max_query_len=640, max_seq_len=700, causal=True, max_num_splits=0,
        scheduler_metadata=None)
    backend.schedule_standard_rows(
        builder, types.SimpleNamespace(scheduler_metadata=None), standard)
    assert standard.scheduler_metadata is None and not calls
    whole = types.SimpleNamespace(scheduler_metadata="whole batch's")
    backend.schedule_standard_rows(builder, whole, standard)
    assert standard.scheduler_metadata == "rows' schedule"
    kw, = calls
    inspect.signature(get_scheduler_metadata).bind(**kw)
    assert kw["cache_seqlens"] is standard.seq_lens
    assert kw["cu_seqlens_q"] is standard.query_start_loc
    assert (kw["batch_size"], kw["max_seqlen_q"], kw["max_seqlen_k"]) == (
        2, 640, 700)
    assert (kw["num_heads_q"], kw["num_heads_kv"], kw["headdim"],
            kw["page_size"]) == (8, 2, 64, 16)
    assert kw["qkv_dtype"] == torch.float16 and kw["causal"] is True
    assert kw["window_size"] == (-1, -1) and kw["num_splits"] == 0
    builder.cache_config.cache_dtype = "fp8"  # FA3 schedules fp8 attention
    backend.schedule_standard_rows(builder, whole, standard)
    assert calls[-1]["qkv_dtype"] == current_platform.fp8_dtype()
