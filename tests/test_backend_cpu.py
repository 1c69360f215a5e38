"""The backend's whole logic on CPU, driven like vLLM drives it.

Scheduler side: vLLM's own ``KVCacheManager`` with our spec and manager.
Worker side: ``SparseMMImpl.forward`` for every layer of every step, over one
packed KV buffer, with the PyTorch references standing in for FlashAttention
and ``reshape_and_cache_flash``. Each request's queries, keys and values are
fixed random tensors per (layer, position), so the exact SparseMM attention of
every token can be computed densely and compared.
"""

import dataclasses
import types

import pytest
import numpy as np
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from vllm_sparsemm import backend
from vllm_sparsemm.block_law import BlockLaw
from vllm_sparsemm.config import BudgetPlan, SparseMMSettings
from vllm_sparsemm.graph_decode import GraphDecode
from vllm_sparsemm.kv_spec import SparseMMSpec
from vllm_sparsemm.page_plan import cdiv
from vllm_sparsemm.plugin import register
from vllm_sparsemm.selection import kept_positions
from vllm_sparsemm.worker_state import RowInfo, StepRows, WorkerKVState

LAYERS, HEADS, KV_HEADS, DIM, BS = 3, 4, 2, 8, 16
BUDGET, WINDOW = 40, 8


@dataclasses.dataclass
class FakeMetadata:
    """The FlashAttention metadata fields the backend reads."""
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    scheduler_metadata: object = None
    sparsemm: object = None


class Engine:
    """A minimal engine loop: vLLM's KV manager on one side, our worker on the other."""

    def __init__(self, num_blocks=400, debug_poison=True, seed=0, tp=1,
                 full_graphs=False):
        register()
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(LAYERS, HEADS, generator=gen) ** 4
        settings = SparseMMSettings(budget=BUDGET, window=WINDOW)
        self.plan = BudgetPlan.build(settings, scores, KV_HEADS)
        # each tensor-parallel rank owns KV_HEADS / tp heads and their queries
        kv_heads, heads = KV_HEADS // tp, HEADS // tp
        spec = SparseMMSpec(block_size=BS, num_kv_heads=kv_heads,
                            head_size=DIM, dtype=torch.float32, plan=self.plan,
                            tp_size=tp)
        config = KVCacheConfig(
            num_blocks=num_blocks, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(
                [f"model.layers.{l}.self_attn.attn" for l in range(LAYERS)],
                spec)])
        self.kv = KVCacheManager(config, max_model_len=4096,
                                 scheduler_block_size=BS, hash_block_size=BS,
                                 enable_caching=False)
        self.manager = self.kv.coordinator.single_type_managers[0]
        self.law = BlockLaw(self.plan, BS, tp)
        self.ranks = [types.SimpleNamespace(
            state=WorkerKVState(self.law, LAYERS, kv_heads, r, debug_poison),
            cache=torch.zeros(num_blocks, LAYERS, kv_heads, BS, 2 * DIM),
            impl=backend.SparseMMImpl(heads, DIM, DIM**-0.5, kv_heads, None,
                                      None, "auto"),
            heads=slice(r * heads, (r + 1) * heads),
            kv_heads=slice(r * kv_heads, (r + 1) * kv_heads))
            for r in range(tp)]
        self.state = self.ranks[0].state
        self.full_graphs = full_graphs
        if full_graphs:  # as the builder sets it up (max_model_len, capacity)
            for rank in self.ranks:
                rank.state.graph = GraphDecode(4096, 64)
        self.layers = [types.SimpleNamespace(
            layer_name=f"model.layers.{l}.self_attn.attn", _k_scale=None,
            _v_scale=None) for l in range(LAYERS)]
        self.free_at_start = self.kv.block_pool.get_num_free_blocks()
        self.requests = {}
        self.worker_rows = {}  # req id -> append-only block ids (worker view)
        self.gen = gen

    def add(self, req_id, prompt_len, total_len):
        request = Request(req_id, list(range(prompt_len)),
                          SamplingParams(max_tokens=total_len), None)
        # fixed "model" activations per (layer, position)
        shape = (LAYERS, total_len)
        request.q = torch.randn(*shape, HEADS, DIM, generator=self.gen)
        request.k = torch.randn(*shape, KV_HEADS, DIM, generator=self.gen)
        request.v = torch.randn(*shape, KV_HEADS, DIM, generator=self.gen)
        request.compaction_end = None
        self.requests[req_id] = request
        return request

    def add_all(self, prompts: dict[str, int], chunk: int, decode: int,
                tail=()):
        """Add requests; return their schedules: prompt chunks, ``decode``
        single-token steps, then the multi-token ``tail`` steps."""
        for rid, prompt in prompts.items():
            self.add(rid, prompt, prompt + decode + sum(tail))
        return {rid: _chunks(p, chunk) + [1] * decode + list(tail)
                for rid, p in prompts.items()}

    def step(self, schedule: dict[str, int], pending_outputs=(), pad_to=0):
        """Run one step; ``schedule`` maps request id -> tokens this step.

        ``pad_to`` pads the batch with empty rows as vLLM does for a full
        CUDA graph: one token each (its q/k/v zeros, its slot -1), query
        length 0, seq_len 0 and a block-table row of block 0."""
        for rid, n in schedule.items():
            request = self.requests[rid]
            blocks = self.kv.allocate_slots(request, n)
            assert blocks is not None, f"no room for {rid}"
            new = (blocks.get_block_ids(allow_none=True) or [None])[0] or []
            if request.num_computed_tokens == 0:
                self.worker_rows[rid] = list(
                    self.kv.get_block_ids(rid)[0])
            else:
                self.worker_rows[rid].extend(new)
        rows, starts, tokens = [], [0], []
        for rid, n in schedule.items():
            request = self.requests[rid]
            rows.append(RowInfo(rid, request.num_prompt_tokens,
                                request.num_computed_tokens, n))
            starts.append(starts[-1] + n)
            tokens += [(rid, p) for p in range(request.num_computed_tokens,
                                               request.num_computed_tokens + n)]
        width = max(len(self.worker_rows[rid]) for rid in schedule)
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, rid in enumerate(schedule):
            table[i, :len(self.worker_rows[rid])] = torch.tensor(
                self.worker_rows[rid])
        slots = []
        for rid, p in tokens:
            row = self.worker_rows[rid]
            slots.append(row[p // BS] * BS + p % BS if p // BS < len(row) else -1)
        pad = max(0, pad_to - len(rows))
        starts += [starts[-1]] * pad
        table = torch.cat([table, table.new_zeros(pad, width)])
        metadata = FakeMetadata(
            num_actual_tokens=len(tokens) + pad,
            max_query_len=max(schedule.values()),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor([r.end for r in rows] + [0] * pad,
                                  dtype=torch.int32),
            max_seq_len=max(r.end for r in rows), block_table=table,
            slot_mapping=torch.tensor(slots + [-1] * pad, dtype=torch.int64))
        # vLLM's dispatch with patches.patch_full_graph_dispatch: FULL for
        # one token per row, none of them in its prompt
        full_graph = self.full_graphs and all(
            r.scheduled == 1 and r.computed >= r.prompt_len for r in rows)
        outputs = []
        for rank in self.ranks:
            backend._worker_state = rank.state
            rank_metadata = dataclasses.replace(metadata)
            # the rows as patches.patch_runner_hooks stashes them
            rank_metadata.sparsemm = backend.step_plan(
                rank.state, StepRows.of(rows), len(rows) + pad,
                len(tokens) + pad,
                torch.tensor(starts), rank_metadata, full_graph)
            self.last_plan = rank_metadata.sparsemm
            rank_out = []
            for l, layer in enumerate(self.layers):
                def stacked(name, heads):
                    real = [getattr(self.requests[r], name)[l, p, heads]
                            for r, p in tokens]
                    return torch.stack(real + [torch.zeros_like(real[0])] * pad)

                q = stacked("q", rank.heads)
                k = stacked("k", rank.kv_heads)
                v = stacked("v", rank.kv_heads)
                # as in vLLM, q, k and v are strided views of one fused QKV
                qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1)
                q, k, v = (part.view(len(tokens) + pad, -1, DIM) for part in
                           qkv.split([q[0].numel(), k[0].numel(),
                                      v[0].numel()], dim=1))
                out = torch.empty_like(q)
                rank.impl.forward(layer, q, k, v, rank.cache[:, l],
                                  rank_metadata, out)
                rank_out.append(out[:len(tokens)])
            outputs.append(torch.stack(rank_out))
        outputs = torch.cat(outputs, dim=2)  # heads of all ranks
        for rid, n in schedule.items():  # vLLM's _update_after_schedule
            request = self.requests[rid]
            if (request.compaction_end is None and request.num_computed_tokens
                    < request.num_prompt_tokens <=
                    request.num_computed_tokens + n):
                request.compaction_end = request.num_computed_tokens + n
            request.num_computed_tokens += n
            request.num_in_flight_tokens += n
        for rid, n in pending_outputs:  # vLLM's update_from_output
            self.requests[rid].num_in_flight_tokens -= n
        return tokens, outputs  # [L, T, Hq, D]

    def expected(self, rid, layer, position):
        """Dense SparseMM attention of one token, straight from the definition."""
        request = self.requests[rid]
        prompt = request.num_prompt_tokens
        q = request.q[layer, position]  # [Hq, D]
        keys, values = request.k[layer], request.v[layer]
        end = request.compaction_end
        compressed = (BUDGET < prompt and end is not None and position >= end)
        group = HEADS // KV_HEADS
        out = torch.empty(HEADS, DIM)
        if compressed:
            caps = self.law.caps[layer]
            kept, counts = kept_positions(request.q[layer, prompt - WINDOW:prompt],
                                          keys[:prompt], caps)
        for h in range(KV_HEADS):
            if compressed:
                visible = torch.cat([kept[h, :counts[h]],
                                     torch.arange(prompt, position + 1)])
            else:
                visible = torch.arange(position + 1)
            for g in range(h * group, (h + 1) * group):
                probs = torch.softmax(q[g] @ keys[visible, h].T * DIM**-0.5, -1)
                out[g] = probs @ values[visible, h]
        return out

    def check(self, tokens, outputs):
        assert torch.isfinite(outputs).all()
        for t, (rid, p) in enumerate(tokens):
            for l in range(LAYERS):
                torch.testing.assert_close(outputs[l, t],
                                           self.expected(rid, l, p),
                                           rtol=1e-5, atol=1e-5)

    def run(self, plans):
        """Step synchronously through per-request chunk lists; yield each step."""
        while any(plans.values()):
            schedule = {rid: plan.pop(0) for rid, plan in plans.items() if plan}
            tokens, outputs = self.step(schedule)
            for rid, n in schedule.items():
                self.requests[rid].num_in_flight_tokens -= n
            yield schedule, tokens, outputs

    def held_blocks(self, rid):
        return sum(not b.is_null for b in self.manager.req_to_blocks[rid])

    def finish(self, rid):
        self.kv.free(self.requests[rid])
        for rank in self.ranks:
            rank.state.finish([rid])


def _chunks(total, size):
    out, done = [], 0
    while done < total:
        out.append(min(size, total - done))
        done += out[-1]
    return out


@pytest.mark.parametrize("chunk", [5, 13, 64, 500])
@pytest.mark.parametrize("async_frees", [False, True])
def test_mixed_batch_matches_dense_sparsemm(chunk, async_frees):
    _run_mixed_batch(chunk, async_frees)


def test_selection_in_chunks_across_requests_matches_dense_sparsemm(
        monkeypatch):
    """The selection scores (request, layer) pairs in chunks of at most
    SELECTION_TOKENS prompt tokens; chunks of 2-5 pairs cross requests."""
    from vllm_sparsemm import layer_ops
    monkeypatch.setattr(layer_ops, "SELECTION_TOKENS", 250)
    _run_mixed_batch(500, False)


def _run_mixed_batch(chunk, async_frees):
    eng = Engine()
    # b fits the budget; equal lengths (a, f and c, e) are selected as one batch
    prompts = {"a": 100, "b": 30, "c": 71, "d": 49, "e": 71, "f": 100}
    decode = 20
    plans = eng.add_all(prompts, chunk, decode)
    last = {}
    while any(plans.values()):
        schedule = {rid: plan.pop(0) for rid, plan in plans.items() if plan}
        pending = list(last.items()) if async_frees else []
        tokens, outputs = eng.step(schedule, pending)
        if not async_frees:
            for rid, n in schedule.items():
                eng.requests[rid].num_in_flight_tokens -= n
        last = schedule
        eng.check(tokens, outputs)
        for rid in schedule:
            request = eng.requests[rid]
            processed = request.num_computed_tokens - request.num_in_flight_tokens
            if (BUDGET < request.num_prompt_tokens
                    and processed > request.num_prompt_tokens):
                # after the scheduler has seen the compaction step processed,
                # the request holds exactly what the block law says
                appended = request.num_computed_tokens - request.num_prompt_tokens
                assert eng.held_blocks(rid) == eng.law.compacted_blocks(
                    request.num_prompt_tokens, appended) or eng.held_blocks(
                        rid) == eng.law.compacted_blocks(
                            request.num_prompt_tokens, appended - 1)
    for rid in prompts:
        request = eng.requests[rid]
        if BUDGET < request.num_prompt_tokens:
            # allocation covers the tokens of the step about to run
            assert eng.held_blocks(rid) == eng.law.compacted_blocks(
                request.num_prompt_tokens, decode - 1)
            assert eng.held_blocks(rid) < cdiv(request.num_prompt_tokens + decode,
                                               BS)
        else:
            assert eng.held_blocks(rid) == cdiv(request.num_prompt_tokens + decode
                                                - 1, BS)
        eng.finish(rid)
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start


def test_same_request_alone_and_in_a_batch_gives_the_same_output():
    def run(with_others):
        eng = Engine(seed=3)
        eng.add("x", 90, 110)
        if with_others:
            for i in range(6):
                eng.add(f"o{i}", 20 + 15 * i, 40 + 15 * i)
        plans = {rid: _chunks(r.num_prompt_tokens, 32) + [1] * 20
                 for rid, r in eng.requests.items()}
        outs = []
        for _, tokens, outputs in eng.run(plans):
            outs += [outputs[:, t] for t, (rid, _) in enumerate(tokens)
                     if rid == "x"]
        return torch.stack(outs)

    torch.testing.assert_close(run(False), run(True), rtol=1e-5, atol=1e-5)


def test_preemption_recompute_and_abort_leak_nothing():
    eng = Engine()
    eng.add("p", 80, 160)
    eng.add("q", 60, 140)
    eng.add("gone", 70, 90)
    for schedule in ({"p": 40, "q": 40, "gone": 35},
                     {"p": 40, "q": 20, "gone": 30}):
        eng.step(schedule)
        for rid in ("p", "q", "gone"):
            eng.requests[rid].num_in_flight_tokens = 0
    eng.finish("gone")  # aborted mid-prefill
    for _ in range(20):
        tokens, outputs = eng.step({"p": 1, "q": 1})
        eng.check(tokens, outputs)
        for rid in ("p", "q"):
            eng.requests[rid].num_in_flight_tokens = 0
    # preempt p by recompute: blocks freed, prompt + outputs re-prefilled;
    # the chunk that crosses the prompt ends past it (E > P), and the last
    # chunk runs several tokens at once on the compacted layout
    request = eng.requests["p"]
    done = request.num_computed_tokens
    eng.kv.free(request)
    request.num_computed_tokens = 0
    request.compaction_end = None
    for chunk in (64, 30, done - 94):
        tokens, outputs = eng.step({"p": chunk, "q": 1} if chunk == 30
                                   else {"p": chunk})
        request.num_in_flight_tokens = 0
        eng.requests["q"].num_in_flight_tokens = 0
        eng.check(tokens, outputs)
    assert request.compaction_end == 94 > request.num_prompt_tokens
    assert done - 94 > 1
    for _ in range(20):
        tokens, outputs = eng.step({"p": 1, "q": 1})
        eng.check(tokens, outputs)
        for rid in ("p", "q"):
            eng.requests[rid].num_in_flight_tokens = 0
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
        for rid in schedule:
            eng.requests[rid].num_in_flight_tokens = 0
        eng.check(tokens, outputs)

    step({"p": 80})
    for _ in range(10):
        step({"p": 1})
    request = eng.requests["p"]
    done = request.num_computed_tokens
    eng.kv.free(request)  # preempted by recompute
    request.num_computed_tokens, request.compaction_end = 0, None
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
        per_rank = [max(p.num_blocks(11) for p in [eng.law.rank_plans(120)[r]])
                    for r in range(tp)]
        assert held["a"] == max(per_rank) == eng.law.compacted_blocks(120, 11)
        results[tp] = (outs, held)
    for one, two in zip(results[1][0], results[2][0]):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert results[2][1]["a"] >= results[1][1]["a"]


def test_selection_batches_split_by_length_and_token_cap(monkeypatch):
    from vllm_sparsemm import worker_state
    monkeypatch.setattr(worker_state, "SELECTION_TOKENS", 250)
    compressing = [(i, types.SimpleNamespace(prompt_len=n))
                   for i, n in enumerate([100, 100, 100, 60, 300, 100])]
    groups = worker_state._selection_groups(compressing)
    assert [(n, [i for i, _ in m]) for n, m in groups] == [
        (100, [0, 1]), (100, [2, 5]), (60, [3]), (300, [4])]


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 3, 1, 2]])
def test_virtual_sequences_list_each_row_head_token_once(query_lens):
    from vllm_sparsemm.worker_state import virtual_sequences
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
    from vllm_sparsemm import worker_state
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
    # a 7B model (32 KV heads of 128, no GQA, W = 32): ~1.3 GB
    assert 1.2e9 < worker_state.selection_scratch_bytes(32, 128, 1, 32) < 1.4e9


def test_triton_decode_kernel_is_refused_without_triton(monkeypatch):
    """``decode_kernel: "triton"`` is taken up by the attention layers, and
    fails at start-up, not silently, where Triton is missing on a CUDA
    machine; without CUDA the kernel never runs, so nothing is refused."""
    from vllm_sparsemm import triton_ops
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
