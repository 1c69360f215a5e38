"""The sparsemm attention backend: FlashAttention plus per-head compressed pages.

vLLM's FlashAttention backend does every standard row (prefill chunks, requests
that are not compressed). Rows of compacted requests attend over their own
per-(layer, KV head) page lists: each (row, KV head) is one virtual sequence
of a single-head page view of the one KV buffer. On CPU (tests) the same
paths run through the PyTorch references.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadata,
    FlashAttentionMetadataBuilder)

from vllm_sparsemm.engine import metrics
from vllm_sparsemm.engine.config import SparseMMSettings
from vllm_sparsemm.engine.graph_decode import GraphDecode
from vllm_sparsemm.engine.host_arrays import upload, virtual_sequences
from vllm_sparsemm.engine.host_threads import limit_host_threads
from vllm_sparsemm.engine.layer_ops import (collect_window_queries, compact,
                                            compressed_page_table,
                                            page_table_width,
                                            prepare_compressed, select_layer,
                                            selects_in,
                                            warm_window_kernels,
                                            write_compressed,
                                            write_standard_reference)
from vllm_sparsemm.engine.plan_setup import settings_for
from vllm_sparsemm.engine.step_plan import (StepPlan,
                                            kernel_selection_tokens,
                                            plan_step,
                                            selection_scratch_bytes)
from vllm_sparsemm.engine.step_rows import StepRows
from vllm_sparsemm.engine.worker_state import (KEY, QUERY, VALUE,
                                               WorkerKVState)
from vllm_sparsemm.kernels import triton_ops
from vllm_sparsemm.kernels.kv_ops import (FP8_CACHE_DTYPES, FP8_KV_DTYPE,
                                          paged_attention_reference)

logger = init_logger("vllm.sparsemm.backend")


@dataclasses.dataclass
class SparseMMMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata, plus this engine's sparsemm state and the
    step's plan (None when every row is plain FlashAttention)."""
    sparsemm_state: WorkerKVState | None = None
    sparsemm_step: StepPlan | None = None


class SparseMMBackend(FlashAttentionBackend):
    # vLLM writes K/V in the standard layout before the attention op (inside
    # the piecewise CUDA graph), for every token with a slot; the builder
    # unsets the slots of compressed rows, whose K/V the impl writes to their
    # own pages (unset_compressed_slots)
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM 0.26.0 only accepts enum member names

    @staticmethod
    def get_impl_cls() -> type["SparseMMImpl"]:
        return SparseMMImpl

    @staticmethod
    def get_builder_cls() -> type["SparseMMMetadataBuilder"]:
        return SparseMMMetadataBuilder

    @classmethod
    def get_required_kv_cache_layout(cls):
        return "HND"  # a (block, head) pair is then one contiguous page

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False  # the kernels read one fp8 scale per layer

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType
        return attn_type == AttentionType.DECODER


class SparseMMMetadataBuilder(FlashAttentionMetadataBuilder):
    # Compaction and page-list building are data dependent: attention runs
    # eagerly between piecewise CUDA graphs, except uniform decode steps when
    # ``full_cuda_graphs`` is on (graph_decode.py)
    _cudagraph_support = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        if settings_for(vllm_config).full_cuda_graphs:
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if vllm_config.use_v2_model_runner:
            raise RuntimeError(
                "sparsemm runs on vLLM's V1 model runner; unset "
                "VLLM_USE_V2_MODEL_RUNNER (the plugin selects V1 itself)")
        # decodes first: compressed decode rows then form the batch's leading
        # rows, and both row kinds are read as slices instead of gathers
        self._init_reorder_batch_threshold(1)
        limit_host_threads(torch.device(device))
        from vllm.distributed import get_tensor_model_parallel_rank
        settings = settings_for(vllm_config)
        metrics.setup(metrics.model_label(vllm_config))  # TP workers too
        # this engine's state: a builder per engine, one KV group per engine
        self.state = WorkerKVState(
            kv_cache_spec.book(), len(layer_names), kv_cache_spec.num_kv_heads,
            get_tensor_model_parallel_rank(), settings.debug_poison,
            vllm_config.cache_config.enable_prefix_caching,
            kv_fp8=str(vllm_config.cache_config.cache_dtype)
            in FP8_CACHE_DTYPES)
        if triton_ops.runs_on(device):
            model = vllm_config.model_config
            heads = kv_cache_spec.num_kv_heads
            self.state.selection_tokens = kernel_selection_tokens(
                heads, kv_cache_spec.head_size, model.get_num_attention_heads(
                    vllm_config.parallel_config) // heads, settings.window)
        if settings.full_cuda_graphs:
            compilation = vllm_config.compilation_config
            self.state.graph = GraphDecode(
                vllm_config.model_config.max_model_len,
                max(vllm_config.scheduler_config.max_num_seqs,
                    compilation.max_cudagraph_capture_size or 0))
        self._rows: StepRows | None = None
        self._full_graph = False

    def hand_step(self, rows: StepRows | None, full_graph: bool) -> None:
        """The rows of the step about to be built (None for vLLM's dummy,
        profile and capture runs) and whether vLLM runs it as a FULL CUDA
        graph: the runner does not pass them (``patches.py``)."""
        self._rows, self._full_graph = rows, full_graph

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        rows, full_graph = self._rows, self._full_graph
        self._rows, self._full_graph = None, False
        bind_before_first_forward(self.state, self.vllm_config,
                                  self.layer_names[0])
        metadata = super().build(common_prefix_len, common_attn_metadata,
                                 fast_build)
        metadata = SparseMMMetadata(**metadata.__dict__,
                                    sparsemm_state=self.state)
        metadata.sparsemm_step = plan = step_plan(
            self.state, rows, common_attn_metadata.num_reqs,
            common_attn_metadata.num_actual_tokens,
            common_attn_metadata.query_start_loc_cpu, metadata, full_graph)
        if plan is not None and plan.standard_metadata is not None:
            schedule_standard_rows(self, metadata, plan.standard_metadata)
        return metadata


def schedule_standard_rows(builder: FlashAttentionMetadataBuilder, metadata,
                           standard) -> None:
    """Give the standard rows' metadata FA3's ahead-of-time schedule of
    those rows, made as ``FlashAttentionMetadataBuilder.build`` makes the
    whole batch's (its ``schedule``), wherever that build made one: without
    it FA3 plans the rows again in every layer's call."""
    if metadata.scheduler_metadata is None:  # FA2, fast builds, ...
        return
    from vllm.v1.attention.backends import flash_attn as fa
    cache_dtype = builder.cache_config.cache_dtype
    qkv_dtype = (current_platform.fp8_dtype()
                 if fa.is_quantized_kv_cache(cache_dtype)
                 else builder.kv_cache_dtype)
    standard.scheduler_metadata = fa.get_scheduler_metadata(
        batch_size=standard.seq_lens.shape[0],
        max_seqlen_q=standard.max_query_len,
        max_seqlen_k=standard.max_seq_len,
        num_heads_q=builder.num_heads_q * builder.dcp_world_size,
        num_heads_kv=builder.num_heads_kv,
        headdim=builder.headdim,
        cache_seqlens=standard.seq_lens,
        qkv_dtype=qkv_dtype,
        cu_seqlens_q=standard.query_start_loc,
        page_size=builder.block_size,
        causal=standard.causal,
        window_size=fa._maybe_symmetrize_window(builder.aot_sliding_window,
                                                standard.causal),
        num_splits=standard.max_num_splits)


def step_plan(state: WorkerKVState, rows, num_reqs: int, num_tokens: int,
              query_start_loc_cpu, metadata,
              full_graph: bool = False) -> StepPlan | None:
    """The plan a step's metadata carries: graph_decode's fixed path for
    steps vLLM runs as FULL CUDA graphs (``full_graph``), else
    :func:`build_step` (None when vLLM gives no rows: its dummy runs)."""
    if full_graph:
        state.graph.check_uniform_decode(rows, num_reqs, num_tokens)
        plan = build_graph_step(state, rows, num_reqs, metadata)
    elif rows is None:
        return None
    else:
        plan = build_step(state, rows, query_start_loc_cpu, metadata)
    if plan is not None:
        unset_compressed_slots(plan, metadata.slot_mapping)
    return plan


def unset_compressed_slots(plan: StepPlan, slot_mapping: torch.Tensor) -> None:
    """Mark the compressed rows' tokens slotless (-1) in vLLM's slot mapping,
    in place: vLLM's KV write before each attention op (``unified_kv_cache_update``,
    in the piecewise graph) then skips them, and ``write_compressed`` puts them
    in their own pages. One fill a step; the forward context's per-layer
    slot mappings are views of this buffer."""
    cr = plan.compressed
    if cr is None:
        return
    if cr.leading:  # compressed tokens first: [0, R)
        slot_mapping[:len(cr.rows)].fill_(-1)
    else:
        slot_mapping.index_fill_(0, cr.tokens, -1)


def build_step(state: WorkerKVState, rows, query_start_loc_cpu,
               metadata) -> StepPlan | None:
    """The step plan attached to the metadata; None when every row is plain FA."""
    report_compaction_times(state)
    query_start = query_start_loc_cpu[:len(rows) + 1].tolist()
    plan = plan_step(state, rows, query_start, metadata.block_table)
    if plan.only_standard and not plan.compressing:
        return None
    if plan.compressed is not None:
        prepare_compressed(plan.compressed, state)
        if plan.standard_rows:
            plan.standard_slots = metadata.slot_mapping[plan.standard_tokens]
            plan.standard_metadata = _restrict(metadata, plan)
    return plan


def report_compaction_times(state: WorkerKVState) -> None:
    """Earlier steps' compaction times, once the device has run them, to
    ``/metrics`` (this process's metrics writer, when it has one)."""
    done = state.timer.collect()  # drained with or without a writer
    writer = metrics.writer()
    if writer is None:
        return
    for seconds in done:
        writer.compaction_seconds.observe(seconds)
    writer.dump()


def build_graph_step(state: WorkerKVState, rows, num_reqs: int,
                     metadata) -> StepPlan:
    """A uniform decode step on graph_decode's fixed path: every row,
    padding included, attends over per-head pages read from fixed buffers."""
    compressed = state.graph.rows(state, rows, num_reqs, metadata.block_table)
    prepare_compressed(compressed, state)
    state.graph.pin(compressed)
    return StepPlan(state, StepRows.of(rows or []),
                    list(range(num_reqs + 1)), [], compressed, [], [])


def _restrict(metadata, plan: StepPlan):
    """FlashAttention metadata for the standard rows alone."""
    device = metadata.query_start_loc.device
    lens = [plan.query_start[i + 1] - plan.query_start[i]
            for i in plan.standard_rows]
    rows, starts = upload([plan.standard_rows, np.cumsum([0] + lens)], device)
    starts = starts.to(metadata.query_start_loc.dtype)
    seq_lens = metadata.seq_lens[rows]
    return dataclasses.replace(
        metadata, num_actual_tokens=sum(lens), max_query_len=max(lens),
        query_start_loc=starts, seq_lens=seq_lens,
        max_seq_len=int(plan.rows.end[plan.standard_rows].max()),
        block_table=metadata.block_table[rows], scheduler_metadata=None,
        slot_mapping=plan.standard_slots)


@functools.cache
def _fa_ops():
    from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
    from vllm.v1.attention.backends.fa_utils import (flash_attn_varlen_func,
                                                     reshape_and_cache_flash)
    return flash_attn_varlen_func, reshape_and_cache_flash, (
        canonicalize_singleton_dim_strides)


class SparseMMImpl(FlashAttentionImpl):

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm.config.vllm import get_current_vllm_config_or_none
        config = get_current_vllm_config_or_none()  # None in CPU tests
        settings = SparseMMSettings.from_sources(
            config.additional_config if config else None)
        self.decode_kernel = settings.decode_kernel
        # only CUDA runs the kernel: CPU runs (the tests) take the reference
        if (self.decode_kernel == "triton" and not triton_ops.AVAILABLE
                and torch.cuda.is_available()):
            raise RuntimeError('sparsemm decode_kernel "triton" (the default) '
                               'needs Triton, which is not installed; set '
                               '--additional-config \'{"decode_kernel": '
                               '"flash_attn"}\'')
        self.selection_scratch = selection_scratch_bytes(
            self.num_kv_heads, self.head_size, self.num_queries_per_kv,
            settings.window)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata,
                output, output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # vLLM's memory profile run
            reserve_selection_scratch(self.selection_scratch, query.device)
            return output.fill_(0)
        plan: StepPlan | None = attn_metadata.sparsemm_step
        state = attn_metadata.sparsemm_state
        index = self._layer_index(layer, kv_cache, state)
        if plan is None:  # dummy run, or no request compressed: plain FA
            if not state.window_kernels_warm:  # vLLM's warm-up runs
                warm_window_kernels(state, query, attn_metadata.block_table)
            return self._standard_attention(layer, query, key, value,
                                            kv_cache, attn_metadata, output)
        compressed = plan.compressed
        if compressed is not None:
            write_compressed(compressed, state, index, key, value)
        if plan.window_rows or plan.selection_batches:
            collect_window_queries(plan, index, query)
        if compressed is None:
            self._standard_attention(layer, query, key, value, kv_cache,
                                     attn_metadata, output)
        else:
            if plan.standard_rows:
                tokens = plan.standard_tokens  # a slice: views, no copies
                out = (output[tokens] if isinstance(tokens, slice) else
                       torch.empty_like(output[tokens]))
                self._standard_attention(layer, query[tokens], key[tokens],
                                         value[tokens], kv_cache,
                                         plan.standard_metadata, out)
                if not isinstance(tokens, slice):
                    output[tokens] = out
            self._compressed_attention(plan, index, query, output)
        if plan.compressing:  # this layer's keys are all in the cache now
            last = index == state.num_layers - 1  # every layer has selected
            # timed only where there is work: two events a layer add up
            timed = last or selects_in(plan, index)
            if timed:
                state.timer.start(query.device)
            select_layer(plan, index, attn_metadata.block_table)
            if last:
                compact(plan, attn_metadata.block_table)
            if timed:
                state.timer.stop(query.device)
            if last:
                state.timer.end_step()
        return output

    def _layer_index(self, layer, kv_cache, state: WorkerKVState) -> int:
        """This layer's index, its slot in the packed buffer checked once
        (decode runs eagerly between graphs: per-layer host time counts)."""
        _bind_once(state, kv_cache)
        checked = getattr(self, "_sparsemm_slot", None)
        if checked is None or checked[0] != kv_cache.data_ptr():
            index = extract_layer_index(layer.layer_name)
            _check_layer_slot(kv_cache, state, index)
            self._sparsemm_slot = checked = (kv_cache.data_ptr(), index)
        state.adopt_scales(checked[1], layer)
        return checked[1]

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        """vLLM's standard-layout write of every token with a slot
        (FlashAttention's own on the GPU; the reference on the CPU)."""
        if kv_cache.is_cuda:
            return super().do_kv_cache_update(layer, key, value, kv_cache,
                                              slot_mapping)
        if kv_cache.dtype == torch.uint8:  # vLLM allocates fp8 as bytes
            kv_cache = kv_cache.view(FP8_KV_DTYPE)
        write_standard_reference(kv_cache, key, value, slot_mapping,
                                 (layer._k_scale, layer._v_scale))

    def _standard_attention(self, layer, query, key, value, kv_cache, metadata,
                            output):
        if kv_cache.is_cuda:
            return super().forward(layer, query, key, value, kv_cache,
                                   metadata, output)
        return _standard_attention_reference(self, layer, query, metadata,
                                             output)

    def _compressed_attention(self, plan: StepPlan, index: int, query, output):
        state, cr = plan.state, plan.compressed
        lengths = cr.lengths[index]  # [R * Hkv]
        triton = triton_ops.runs_on(query)
        # debug runs build page tables with the checked PyTorch reference
        from_plan = triton and not state.debug_poison
        if cr.leading and triton and self.decode_kernel == "triton":
            # one launch (two if split) that reads the strided query in
            # place and, outside debug runs, finds each page from the plan:
            # no page table is built
            rows = len(cr.rows)
            table = None if from_plan else compressed_page_table(cr, state,
                                                                 index)
            triton_ops.paged_decode(
                query[:rows], state.pages, table, lengths, self.scale,
                output[:rows], plan=(cr, index, state) if from_plan else None,
                scales=state.scales(index),
                num_splits=triton_decode_splits(rows * state.num_kv_heads,
                                                sm_count(query.device)))
            return
        if from_plan:
            table = triton_ops.page_table(cr, state, index,
                                          page_table_width(cr, state))
        else:
            table = compressed_page_table(cr, state, index)
        if cr.leading:  # decode rows first: (row, head) sequences are views
            rows = len(cr.rows)
            self._attend_per_kv_head(
                state, index, query[:rows], None, None, cr.virtual_starts,
                table, lengths, 1, cr.max_length, output[:rows])
            return
        output[cr.tokens] = self._attend_per_kv_head(
            state, index, query[cr.tokens], cr.virtual_token,
            cr.virtual_head, cr.virtual_starts, table, lengths,
            cr.max_query_len, cr.max_length, dtype=output.dtype)

    def _attend_per_kv_head(self, state, layer, query, token, head, starts,
                            table, lengths, max_query_len, max_length,
                            out=None, dtype=None):
        """Attention of ``query [T, Hq, D]`` as one single-head paged sequence
        per (row, KV head) of ``layer``: FlashAttention on GPU, the reference
        on CPU.

        ``token``/``head`` list each sequence's query entries in (row, head,
        token) order; None when every row has one token, so the sequences
        are a view of ``query`` and the result is written into ``out``;
        otherwise the result is returned in ``dtype`` (the model's: an fp8
        cache's queries come quantized).
        """
        dtype = out.dtype if out is not None else dtype
        dim, group = self.head_size, self.num_queries_per_kv
        q = query.view(len(query), -1, group, dim)
        # vLLM's query is a strided view of the fused QKV output: copy it
        q_virtual = (q.reshape(-1, group, dim) if token is None else
                     q[token, head])
        if token is None and out.is_contiguous():
            out_virtual = out.view(q_virtual.shape)
        else:
            out_virtual = torch.empty_like(q_virtual, dtype=dtype)
        scales = state.scales(layer)
        if query.is_cuda:
            flash_attn_varlen_func, _, _ = _fa_ops()
            keys, values = _single_head_pages(state, dim)
            descales = {} if scales is None else {
                f"{name}_descale": scales[column].expand(len(starts) - 1, 1)
                for name, column in (("k", KEY), ("v", VALUE), ("q", QUERY))}
            flash_attn_varlen_func(
                q=q_virtual, k=keys, v=values,
                out=out_virtual, cu_seqlens_q=starts,
                max_seqlen_q=max_query_len, seqused_k=lengths,
                max_seqlen_k=max_length, softmax_scale=self.scale,
                causal=True, block_table=table,
                fa_version=self.vllm_flash_attn_version,
                num_splits=num_splits(len(starts) - 1,
                                      sm_count(query.device)), **descales)
        else:
            out_virtual.copy_(paged_attention_reference(
                q_virtual, state.pages[..., :dim], state.pages[..., dim:],
                table, lengths, starts, self.scale,
                scales=scales, out_dtype=dtype))
        if token is None:
            if out_virtual.data_ptr() != out.data_ptr():
                out.copy_(out_virtual.view(out.shape))
            return out
        result = torch.empty_like(q, dtype=dtype)
        result[token, head] = out_virtual
        return result.view(query.shape)


def num_splits(num_sequences: int, num_sms: int) -> int:
    """FlashAttention's KV split count for the per-head sequences: 1 once
    they alone fill the GPU twice over, else 0 (FA's own heuristic).

    With varlen inputs FA3 sizes its splits as if there were one long
    sequence, then launches its combine kernel in every layer, a cost that
    buys nothing once there are enough sequences. Depends only on the
    (padded) row count, so a captured graph and its replays agree.
    """
    return 1 if num_sequences >= 2 * num_sms else 0


def triton_decode_splits(num_sequences: int, num_sms: int) -> int:
    """``triton_ops.paged_decode``'s key splits: each sequence's pages in
    that many parts, so that there are ~32 programs per SM, at most 16 parts.

    Compressed heads are lopsided: a visual head may keep tens of times the
    tokens of the median head. With one program per head and few rows, that
    head's walk, a page per iteration, is the layer's critical path; many
    rows fill the GPU unsplit. A function of the (padded) row count only,
    so a captured graph and its replays agree."""
    return min(triton_ops.MAX_SPLITS,
               max(1, -(-32 * num_sms // max(num_sequences, 1))))


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _single_head_pages(state: WorkerKVState, dim: int):
    """K and V of every page as FlashAttention's single-head paged cache
    ``[pages, bs, 1, D]``: views of the one buffer, built once per buffer."""
    if state.attention_views is None:
        _, _, canonical = _fa_ops()
        state.attention_views = (canonical(state.pages[..., :dim].unsqueeze(2)),
                                 canonical(state.pages[..., dim:].unsqueeze(2)))
    return state.attention_views


def reserve_selection_scratch(nbytes: int, device: torch.device) -> None:
    """Allocate (and drop) the selection's scratch in the memory profile run,
    so the peak vLLM measures there, and sizes the KV cache by, includes it."""
    if device.type == "cuda":
        torch.empty(nbytes, dtype=torch.uint8, device=device)


def bind_before_first_forward(state: WorkerKVState, vllm_config,
                              layer_name: str) -> None:
    """Bind the packed KV buffer from vLLM's forward context.

    Layers bind it on their first forward, but a full-graph capture builds
    metadata (graph_decode's page tables need the buffer's shape) before any
    layer has run. Before vLLM allocates the cache there is nothing to bind.
    """
    if state.pages is not None:
        return
    layer = vllm_config.compilation_config.static_forward_context.get(
        layer_name)
    kv_cache = getattr(layer, "kv_cache", None)
    if isinstance(kv_cache, torch.Tensor) and kv_cache.numel():
        _bind_once(state, kv_cache)


def _bind_once(state: WorkerKVState, kv_cache: torch.Tensor) -> None:
    """Adopt the packed buffer behind a layer's ``kv_cache`` unless bound."""
    if state.pages is None:
        state.bind_cache(_page_view(kv_cache, state))


def _page_view(kv_cache: torch.Tensor, state: WorkerKVState) -> torch.Tensor:
    """All layers' KV as pages ``[NB * L * Hkv, bs, 2D]`` (vLLM's packed layout)."""
    num_blocks, heads, block_size, width = kv_cache.shape
    page = heads * block_size * width
    if kv_cache.stride(0) != state.num_layers * page:
        raise RuntimeError(
            "sparsemm needs every layer's KV cache in one block-major buffer "
            f"(block stride {state.num_layers * page}, got "
            f"{kv_cache.stride(0)}); the packed-layout patch did not apply")
    base = torch.empty(0, dtype=kv_cache.dtype,
                       device=kv_cache.device).set_(kv_cache.untyped_storage())
    pages = num_blocks * state.num_layers * heads
    return base[:pages * block_size * width].view(pages, block_size, width)


def _check_layer_slot(kv_cache, state: WorkerKVState, index: int) -> None:
    offset = kv_cache.data_ptr() - state.pages.data_ptr()
    slot = offset // (kv_cache.stride(1) * kv_cache.shape[1] *
                      kv_cache.element_size())
    if slot != index:
        raise RuntimeError(f"sparsemm: layer {index} sits at slot {slot} of "
                           f"the packed KV buffer; expected model order")


def _standard_attention_reference(impl, layer, query, metadata, output):
    """CPU stand-in for FlashAttention on the standard paged layout."""
    state = metadata.sparsemm_state
    index = extract_layer_index(layer.layer_name)
    heads = impl.num_kv_heads
    starts = metadata.query_start_loc.long()
    num_rows = len(starts) - 1
    blocks = metadata.block_table[:num_rows].long()
    table = state.space.page_id(index, blocks[:, None, :],
                                torch.arange(heads)[None, :, None])
    token, head, virtual_starts = map(torch.from_numpy, virtual_sequences(
        starts.diff().numpy(), heads))
    total = int(starts[-1])
    output[:total] = impl._attend_per_kv_head(
        state, index, query[:total], token, head, virtual_starts,
        table.reshape(num_rows * heads, -1).to(torch.int32),
        metadata.seq_lens[:num_rows].repeat_interleave(heads).to(torch.int32),
        metadata.max_query_len, metadata.max_seq_len, dtype=output.dtype)
    return output
