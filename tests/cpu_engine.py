"""A minimal engine loop on the CPU: vLLM's own KV manager and block table on
one side, sparsemm's attention layers on the other.

Scheduler side: vLLM's ``KVCacheManager`` with our spec and manager (prefix
caching on or off). Worker side: vLLM's ``BlockTable``, as wide as the runner
makes it (``spec.max_num_blocks_per_req``), and ``SparseMMImpl.forward`` for
every layer of every step over one packed KV buffer, with the PyTorch
references standing in for FlashAttention and ``reshape_and_cache_flash``.
Each request's queries, keys and values are fixed random tensors per (layer,
position), so the exact SparseMM attention of every token can be computed
densely and compared.
"""

import dataclasses
import types

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import (get_request_block_hasher,
                                         init_none_hash)
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request, RequestStatus
from vllm.v1.worker.block_table import BlockTable

from vllm_sparsemm.engine import backend
from vllm_sparsemm.core.budget import BudgetPlan
from vllm_sparsemm.engine.config import SparseMMSettings
from vllm_sparsemm.engine.graph_decode import GraphDecode
from vllm_sparsemm.engine.kv_spec import SparseMMSpec
from vllm_sparsemm.engine.plugin import register
from vllm_sparsemm.engine.request_options import request_budget
from vllm_sparsemm.core.selection import kept_positions
from vllm_sparsemm.engine.step_rows import RowInfo, StepRows
from vllm_sparsemm.engine.worker_state import WorkerKVState
from vllm_sparsemm.kernels.kv_ops import FP8_KV_DTYPE, from_cache, to_cache

LAYERS, HEADS, KV_HEADS, DIM, BS = 3, 4, 2, 8, 16
BUDGET, WINDOW = 40, 8
MAX_MODEL_LEN = 4096


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
    sparsemm_state: object = None
    sparsemm_step: object = None


def attention_layer(impl, layer, query, key, value, kv_cache, metadata,
                    output):
    """What vLLM's ``Attention.forward`` runs for one layer: the backend's
    KV write first, unless its forward includes it, then the forward."""
    if (metadata is not None
            and not backend.SparseMMBackend.forward_includes_kv_cache_update):
        impl.do_kv_cache_update(layer, key, value, kv_cache,
                                metadata.slot_mapping)
    return impl.forward(layer, query, key, value, kv_cache, metadata, output)


def _hash(value) -> bytes:
    import hashlib
    import pickle
    return hashlib.sha256(pickle.dumps(value)).digest()


class Engine:
    """vLLM's KV manager and block table, and our worker, stepped by hand."""

    def __init__(self, num_blocks=400, debug_poison=True, seed=0, tp=1,
                 full_graphs=False, caching=False,
                 max_model_len=MAX_MODEL_LEN, budget=BUDGET, scores=None,
                 width=None, kv_cache_dtype="auto"):
        register()
        gen = torch.Generator().manual_seed(seed)
        if scores is None:
            scores = torch.rand(LAYERS, HEADS, generator=gen) ** 4
        settings = SparseMMSettings(budget=budget, window=WINDOW)
        self.budget = budget
        self.plan = BudgetPlan.build(settings, scores, KV_HEADS)
        # each tensor-parallel rank owns KV_HEADS / tp heads and their queries
        kv_heads, heads = KV_HEADS // tp, HEADS // tp
        # ``kv_cache_dtype="fp8"``: vLLM allocates bytes, the attention
        # layer quantizes queries, and each layer has its own scales
        self.fp8 = kv_cache_dtype == "fp8"
        cache_dtype = torch.uint8 if self.fp8 else torch.float32
        self.spec = SparseMMSpec(block_size=BS, num_kv_heads=kv_heads,
                                 head_size=DIM, dtype=cache_dtype,
                                 plan=self.plan, tp_size=tp)
        config = KVCacheConfig(
            num_blocks=num_blocks, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(
                [f"model.layers.{l}.self_attn.attn" for l in range(LAYERS)],
                self.spec)])
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(config, max_model_len=max_model_len,
                                 scheduler_block_size=BS, hash_block_size=BS,
                                 enable_caching=caching)
        self.caching = caching
        init_none_hash(_hash)
        self.hasher = get_request_block_hasher(BS, _hash)
        self.manager = self.kv.coordinator.single_type_managers[0]
        self.law = self.spec.law()
        # the runner's block table: rows as wide as vLLM makes them (tests
        # of the failure mode pass a narrower ``width``)
        self.width = width or self.spec.max_num_blocks_per_req(None,
                                                               max_model_len)
        self.strict_rows = width is None
        self.table = BlockTable(BS, max_num_reqs=64,
                                max_num_blocks_per_req=self.width,
                                max_num_batched_tokens=max_model_len,
                                pin_memory=False, device=torch.device("cpu"),
                                kernel_block_size=BS,
                                cp_kv_cache_interleave_size=1)
        self.row_of: dict[str, int] = {}
        self.book = self.spec.book()
        self.ranks = [types.SimpleNamespace(
            state=WorkerKVState(self.book, LAYERS, kv_heads, r, debug_poison,
                                prompt_blocks_cached=caching,
                                kv_fp8=self.fp8),
            cache=torch.zeros(num_blocks, LAYERS, kv_heads, BS, 2 * DIM,
                              dtype=cache_dtype),
            impl=backend.SparseMMImpl(heads, DIM, DIM**-0.5, kv_heads, None,
                                      None, kv_cache_dtype),
            heads=slice(r * heads, (r + 1) * heads),
            kv_heads=slice(r * kv_heads, (r + 1) * kv_heads))
            for r in range(tp)]
        self.state = self.ranks[0].state
        self.full_graphs = full_graphs
        if full_graphs:  # as the builder sets it up (max_model_len, capacity)
            for rank in self.ranks:
                rank.state.graph = GraphDecode(max_model_len, 64)
        # scales unlike 1 and unlike each other, so that a missed or
        # swapped one shows
        self.layers = [types.SimpleNamespace(
            layer_name=f"model.layers.{l}.self_attn.attn",
            _k_scale=torch.tensor(0.5 + l), _v_scale=torch.tensor(2.0 / (l + 1)),
            _q_scale=torch.tensor(0.25 * (l + 1))) for l in range(LAYERS)]
        self.free_at_start = self.kv.block_pool.get_num_free_blocks()
        self.requests = {}
        self.gen = gen
        self.last_plan = None

    def add(self, req_id, prompt_len, total_len, tokens=None, budget=None):
        """A request; ``tokens`` (its prompt ids) decide prefix-cache hits, and
        with them its activations: equal prefixes give equal K/V. ``budget``
        is its own ``sparsemm_budget`` (0: off)."""
        if tokens is None:  # a prompt of its own: no prefix shared by chance
            first = 100_000 * (len(self.requests) + 1)
            tokens = range(first, first + prompt_len)
        tokens = list(tokens)
        extra = None if budget is None else {"sparsemm_budget": budget}
        request = Request(req_id, tokens,
                          SamplingParams(max_tokens=total_len,
                                         extra_args=extra),
                          None, block_hasher=self.hasher)
        # fixed "model" activations per (layer, position), a function of the
        # token ids up to that position when they are given
        shape = (LAYERS, total_len)
        request.q = torch.randn(*shape, HEADS, DIM, generator=self.gen)
        request.k = torch.randn(*shape, KV_HEADS, DIM, generator=self.gen)
        request.v = torch.randn(*shape, KV_HEADS, DIM, generator=self.gen)
        for position in range(prompt_len):
            prefix = torch.Generator().manual_seed(
                hash(tuple(tokens[:position + 1])) % (1 << 62))
            for name, heads in (("q", HEADS), ("k", KV_HEADS),
                                ("v", KV_HEADS)):
                getattr(request, name)[:, position] = torch.randn(
                    LAYERS, heads, DIM, generator=prefix)
        request.compaction_end = None
        self.requests[req_id] = request
        return request

    def add_all(self, prompts: dict[str, int], chunk: int, decode: int,
                tail=()):
        """Add requests; return their schedules: prompt chunks, ``decode``
        single-token steps, then the multi-token ``tail`` steps."""
        for rid, prompt in prompts.items():
            self.add(rid, prompt, prompt + decode + sum(tail))
        return {rid: chunks(p, chunk) + [1] * decode + list(tail)
                for rid, p in prompts.items()}

    def _allocate(self, request, n):
        """vLLM's scheduler for one request: a prefix-cache lookup for a new
        one, then ``allocate_slots``; the runner's block-table row follows."""
        rid = request.request_id
        hit_blocks, hit = None, 0
        if rid not in self.row_of and request.num_computed_tokens == 0:
            hit_blocks, hit, _ = self.kv.get_computed_blocks(request)
            request.num_computed_tokens = hit
            n = min(n, request.num_tokens - hit) if hit else n
        if rid in self.row_of:  # running: the scheduler's own call
            blocks = self.kv.allocate_slots(request, n,
                                            num_lookahead_tokens=0)
        else:
            blocks = self.kv.allocate_slots(request, n, hit,
                                            hit_blocks if hit else None)
            request.status = RequestStatus.RUNNING
        assert blocks is not None, f"no room for {rid}"
        if rid not in self.row_of:
            self.row_of[rid] = min(set(range(64)) - set(self.row_of.values()))
            self.table.add_row(list(self.kv.get_block_ids(rid)[0]),
                               self.row_of[rid])
        else:
            new = (blocks.get_block_ids(allow_none=True) or [None])[0] or []
            self.table.append_row(list(new), self.row_of[rid])
        row = self.row_of[rid]
        # the runner's row holds the manager's whole list, never more
        assert self.table.num_blocks_per_row[row] <= self.width or (
            not self.strict_rows)
        assert (self.table.block_table.np[row, :self.table.num_blocks_per_row[
            row]].tolist() == list(self.kv.get_block_ids(rid)[0])) or any(
            b.is_null for b in self.manager.req_to_blocks[rid])
        return n

    def step(self, schedule: dict[str, int], pending_outputs=(), pad_to=0):
        """Run one step; ``schedule`` maps request id -> tokens this step.

        ``pad_to`` pads the batch with empty rows as vLLM does for a full
        CUDA graph: one token each (its q/k/v zeros, its slot -1), query
        length 0, seq_len 0 and a block-table row of block 0."""
        schedule = {rid: self._allocate(self.requests[rid], n)
                    for rid, n in schedule.items()}
        rows, starts, tokens = [], [0], []
        for rid, n in schedule.items():
            request = self.requests[rid]
            rows.append(RowInfo(rid, request.num_prompt_tokens,
                                request.num_computed_tokens, n))
            starts.append(starts[-1] + n)
            tokens += [(rid, p) for p in range(request.num_computed_tokens,
                                               request.num_computed_tokens + n)]
        # the runner's rows, full width, as the builder gets them
        table = torch.from_numpy(self.table.block_table.np[
            [self.row_of[rid] for rid in schedule]].copy())
        slots = []
        for rid, p in tokens:
            block = int(table[list(schedule).index(rid), p // BS])
            slots.append(block * BS + p % BS)
        pad = max(0, pad_to - len(rows))
        starts += [starts[-1]] * pad
        table = torch.cat([table, table.new_zeros(pad, self.width)])
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
            rank_metadata = dataclasses.replace(metadata,
                                                sparsemm_state=rank.state)
            # the rows as patches.patch_runner_hooks hands them over
            steps = StepRows.of(rows)
            steps.budget_of = self.budget_of
            rank_metadata.sparsemm_step = backend.step_plan(
                rank.state, steps, len(rows) + pad,
                len(tokens) + pad,
                torch.tensor(starts), rank_metadata, full_graph)
            self.last_plan = rank_metadata.sparsemm_step
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
                if self.fp8:  # as vLLM's Attention.forward hands them over
                    q = to_cache(q, FP8_KV_DTYPE, layer._q_scale)
                attention_layer(rank.impl, layer, q, k, v, rank.cache[:, l],
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

    def processed(self, rids) -> None:
        """vLLM's ``update_from_output`` for a step run synchronously: no
        token of ``rids`` (ids, or a schedule) is in flight any more."""
        for rid in rids:
            self.requests[rid].num_in_flight_tokens = 0

    def budget_of(self, rid):
        """A request's own budget, as the runner hook reads it."""
        return request_budget(self.requests[rid].sampling_params.extra_args)

    def expected(self, rid, layer, position):
        """Dense SparseMM attention of one token, straight from the definition."""
        request = self.requests[rid]
        prompt = request.num_prompt_tokens
        q, keys, values = (self.as_cached(getattr(request, name)[layer],
                                          layer, name)
                           for name in ("q", "k", "v"))
        q_window = q[prompt - WINDOW:prompt]
        q = q[position]  # [Hq, D]
        end = request.compaction_end
        law = self.book.law(self.budget_of(rid))
        compressed = (law is not None and law.compresses(prompt)
                      and end is not None and position >= end)
        group = HEADS // KV_HEADS
        out = torch.empty(HEADS, DIM)
        if compressed:
            caps = law.caps[layer]
            kept, counts = kept_positions(q_window, keys[:prompt], caps)
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

    def as_cached(self, values, layer, name):
        """``values`` as attention reads them: fp8-rounded with ``layer``'s
        scale for an fp8 cache (queries too: vLLM quantizes them)."""
        if not self.fp8:
            return values
        scale = getattr(self.layers[layer], f"_{name}_scale")
        return from_cache(to_cache(values, FP8_KV_DTYPE, scale), scale)

    def check(self, tokens, outputs):
        """Every token's output against the dense definition. Both sides run
        float32 softmaxes over the same keys in different orders (paged and
        chunked against dense); 1e-5 is a few float32 ulps of these O(1)
        values, far below the gap a wrongly kept or dropped key makes."""
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
            self.processed(schedule)
            yield schedule, tokens, outputs

    def held_blocks(self, rid):
        return sum(not b.is_null for b in self.manager.req_to_blocks[rid])

    def preempt(self, rid):
        """vLLM's recompute preemption: blocks freed, computed tokens reset."""
        request = self.requests[rid]
        self.kv.free(request)
        self._drop_row(rid)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.compaction_end = None

    def finish(self, rid):
        self.kv.free(self.requests[rid])
        self._drop_row(rid)
        for rank in self.ranks:
            rank.state.finish([rid])

    def _drop_row(self, rid):
        row = self.row_of.pop(rid, None)
        if row is not None:
            self.table.clear_row(row)
            self.table.num_blocks_per_row[row] = 0


def chunks(total, size):
    out, done = [], 0
    while done < total:
        out.append(min(size, total - done))
        done += out[-1]
    return out
