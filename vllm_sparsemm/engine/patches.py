"""Every patch of vLLM 0.26.0 internals the plugin needs, in one place.

Each patch names the vLLM function it replaces or wraps and why. All of them
leave vLLM's behaviour unchanged unless the sparsemm backend is selected
(``--attention-backend sparsemm`` or ``CUSTOM`` while this plugin owns CUSTOM).
"""

from __future__ import annotations

import functools
import itertools
import sys

import torch
from vllm.logger import init_logger
from vllm.v1.core.block_pool import BlockPool

from vllm_sparsemm.kernels.kv_ops import FP8_CACHE_DTYPES

logger = init_logger("vllm.sparsemm.patches")

BACKEND_PATH = "vllm_sparsemm.engine.backend.SparseMMBackend"
ALIAS = "sparsemm"


def is_sparsemm(vllm_config) -> bool:
    """Whether this engine config selects the sparsemm backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    attention = getattr(vllm_config, "attention_config", None)
    return (attention is not None
            and attention.backend == AttentionBackendEnum.CUSTOM
            and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH)


_patched: set[tuple[int, str]] = set()


def _wrap(owner, name, make):
    """Replace ``owner.name`` with ``make(original)`` once per process."""
    if (id(owner), name) in _patched:
        return
    original = owner.__dict__[name] if name in owner.__dict__ else getattr(
        owner, name)
    setattr(owner, name, make(original))
    _patched.add((id(owner), name))


def patch_backend_name() -> None:
    """Replaces ``AttentionConfig.validate_backend_before``: vLLM 0.26.0 has no
    public way to add a backend name, so map "sparsemm" onto the CUSTOM slot.
    (Covers ``--attention-backend`` and ``LLM(attention_backend=...)``.)"""
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def make(original):
        func = original.__func__

        @functools.wraps(func)
        def validate_backend_before(cls, value):
            if isinstance(value, str) and value.lower() == ALIAS:
                return AttentionBackendEnum.CUSTOM
            return func(cls, value)

        return classmethod(validate_backend_before)

    _wrap(AttentionConfig, "validate_backend_before", make)


def patch_engine_config() -> None:
    """Wraps ``VllmConfig.__post_init__``: when sparsemm is selected, validate
    the settings and score file up front and refuse what the backend does not
    handle, before any weight loads; and mark the config with the graph
    contract (``GRAPH_CONTRACT``) so that vLLM's compile caches, keyed by the
    config's hash, never hand back a graph built for another one."""
    from vllm.config import VllmConfig

    def make(original):

        @functools.wraps(original)
        def __post_init__(self):
            if is_sparsemm(self):
                _prepare_engine_config(self)
            original(self)

        return __post_init__

    _wrap(VllmConfig, "__post_init__", make)


# What the compiled model graph holds of this backend: vLLM's KV write op
# before each attention op (SparseMMBackend.forward_includes_kv_cache_update
# False). Graphs compiled by a plugin version without it must not be reused.
GRAPH_CONTRACT = {"sparsemm_graph": "kv-write-op"}


def _prepare_engine_config(vllm_config) -> None:
    from vllm_sparsemm.engine.plan_setup import budget_plan, settings_for
    cache = vllm_config.cache_config
    unsupported = unsupported_features(vllm_config)
    if unsupported:
        raise ValueError("the sparsemm attention backend does not support "
                         + "; ".join(unsupported))
    if isinstance(vllm_config.additional_config, dict):  # in compute_hash
        vllm_config.additional_config.update(GRAPH_CONTRACT)
    if vllm_config.model_config is None:
        return
    settings = settings_for(vllm_config)
    _, source = budget_plan(vllm_config)  # fails here on a bad score file
    global _request_window
    _request_window = settings.window
    from vllm_sparsemm.engine import encoder_cache, metrics
    encoder_outputs = encoder_cache.configure(vllm_config,
                                              settings.encoder_cpu_cache_gib)
    metrics.setup(metrics.model_label(vllm_config))
    if _scaled_out_api_server(vllm_config.parallel_config):
        return  # the launcher process has logged the settings
    logger.info_once(
        "sparsemm: budget=%d window=%d ratio=%s pool_kernel=%d "
        "block_size=%s admission_reserve=%d admission_pacing=%s "
        "full_cuda_graphs=%s decode_kernel=%s debug_poison=%s "
        "encoder_cpu_cache_gib=%s kv_cache_dtype=%s prefix_caching=%s "
        "head_scores=%s",
        settings.budget, settings.window, settings.ratio,
        settings.pool_kernel, cache.block_size, settings.admission_reserve,
        settings.admission_pacing, settings.full_cuda_graphs,
        settings.decode_kernel, settings.debug_poison, encoder_outputs,
        cache.cache_dtype, "on" if cache.enable_prefix_caching else "off",
        source)


def _scaled_out_api_server(parallel) -> bool:
    """One of vLLM's API processes under ``--api-server-count`` > 1 (ranks
    0..N-1; the launcher and the engine core hold rank -1)."""
    return parallel._api_process_count > 1 and parallel._api_process_rank >= 0


def unsupported_features(vllm_config) -> list[str]:
    """What this engine config asks for that sparsemm cannot serve, each with
    what to change."""
    cache, parallel = vllm_config.cache_config, vllm_config.parallel_config
    found = []
    if vllm_config.speculative_config is not None:
        found.append("speculative decoding (drop --speculative-config)")
    if vllm_config.kv_transfer_config is not None:
        found.append("KV connectors (drop --kv-transfer-config)")
    if parallel.pipeline_parallel_size > 1:
        found.append("pipeline parallelism (use --pipeline-parallel-size 1)")
    if parallel.decode_context_parallel_size > 1:
        found.append("decode context parallelism (use "
                     "--decode-context-parallel-size 1)")
    if parallel.prefill_context_parallel_size > 1:
        found.append("prefill context parallelism (use "
                     "--prefill-context-parallel-size 1)")
    if parallel.use_ubatching:
        found.append("dual-batch overlap / micro-batching (drop --enable-dbo "
                     "and --ubatch-size)")
    import vllm.envs as envs
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        found.append("vLLM's V2 model runner (unset VLLM_USE_V2_MODEL_RUNNER: "
                     "the plugin selects the V1 runner itself)")
    model = vllm_config.model_config
    found += _kv_cache_dtype_problems(cache, model)
    if model is not None:
        found += _model_problems(model)
    tp = parallel.tensor_parallel_size
    if model is not None and tp > 1:
        kv_heads = model.get_total_num_kv_heads()
        if kv_heads % tp:
            found.append(f"tensor parallelism {tp} over {kv_heads} KV heads "
                         f"(vLLM would replicate heads; use a "
                         f"--tensor-parallel-size that divides {kv_heads})")
    return found


# vLLM's flags of models whose layers are not all full attention over one
# KV cache, which the block law assumes
_MODEL_KINDS = (("is_encoder_decoder", "cross-attention (encoder-decoder)"),
                ("is_attention_free", "no attention layers"),
                ("is_hybrid", "state-space layers beside attention"),
                ("use_mla", "multi-head latent attention"))


def _model_problems(model) -> list[str]:
    """The model itself, when its layers are of a kind sparsemm cannot
    compress, named with what it has."""
    kinds = [words for flag, words in _MODEL_KINDS
             if getattr(model, flag, False) is True]
    if not kinds:
        return []
    return [f"{model_name(model)}, whose layers have {', '.join(kinds)} "
            f"(sparsemm serves models whose every decoder layer is full "
            f"attention; choose another --attention-backend)"]


def model_name(model) -> str:
    """The model's architecture as its config names it (else its path)."""
    architectures = getattr(getattr(model, "hf_config", None),
                            "architectures", None)
    return ", ".join(architectures or ()) or str(getattr(model, "model", "?"))


KV_CACHE_DTYPES = ("auto", "float16", "bfloat16") + FP8_CACHE_DTYPES


def _kv_cache_dtype_problems(cache, model) -> list[str]:
    """KV dtypes sparsemm serves: the model's, and fp8 (e4m3) with static
    per-layer scales, on FlashAttention 3 (Hopper) as stock vLLM serves it.
    FA3 writes fp8 attention's output in bf16 only, so an fp16 model would
    fail at its first prompt: refuse it here, naming the fix."""
    dtype = str(cache.cache_dtype)
    if dtype not in KV_CACHE_DTYPES:
        return [f"--kv-cache-dtype {dtype} (use auto or fp8)"]
    if dtype not in FP8_CACHE_DTYPES:
        return []
    found = []
    if getattr(cache, "kv_cache_dtype_skip_layers", None):
        found.append("--kv-cache-dtype-skip-layers (sparsemm keeps every "
                     "layer's KV in one buffer of one dtype)")
    if getattr(cache, "calculate_kv_scales", False):
        found.append("--calculate-kv-scales (fp8 scales must be static: "
                     "take them from the checkpoint, or drop the flag)")
    if getattr(model, "dtype", None) == torch.float16:
        found.append("--kv-cache-dtype fp8 with a float16 model (FlashAttention"
                     " 3 gives fp8 attention bf16 outputs only; add --dtype "
                     "bfloat16)")
    from vllm.platforms import current_platform
    if current_platform.is_cuda():
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
        if not FlashAttentionBackend.supports_kv_cache_dtype(dtype):
            found.append(f"--kv-cache-dtype {dtype} on this GPU (fp8 KV "
                         f"needs FlashAttention 3 on a Hopper GPU; use auto)")
    return found


def patch_model_runner_choice() -> None:
    """Replaces the ``VllmConfig.use_v2_model_runner`` property: sparsemm needs
    the V1 runner (its metadata hook below), so the plugin picks V1 itself
    unless the user forced a runner with VLLM_USE_V2_MODEL_RUNNER."""
    import os

    from vllm.config import VllmConfig

    def make(original):

        def use_v2_model_runner(self):
            if (is_sparsemm(self)
                    and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None):
                return False
            return original.fget(self)

        return property(use_v2_model_runner)

    _wrap(VllmConfig, "use_v2_model_runner", make)


def patch_packed_kv_layout() -> None:
    """Replaces ``vllm.v1.core.kv_cache_utils._use_packed_kv_cache_config``: put
    every layer's KV in one block-major buffer ``[blocks, layers, ...]`` so any
    layer's heads can use any page of a request's blocks (exact accounting)."""
    from vllm.v1.core import kv_cache_utils

    def make(original):

        @functools.wraps(original)
        def _use_packed_kv_cache_config(vllm_config, kv_cache_groups):
            if is_sparsemm(vllm_config) and len(kv_cache_groups) == 1:
                return True
            return original(vllm_config, kv_cache_groups)

        return _use_packed_kv_cache_config

    _wrap(kv_cache_utils, "_use_packed_kv_cache_config", make)


def patch_layer_spec() -> None:
    """Wraps ``Attention.get_kv_cache_spec``: sparsemm layers report a
    ``SparseMMSpec`` (full attention plus the budget plan), which selects the
    scheduler-side manager that frees compacted blocks."""
    from vllm.model_executor.layers.attention.attention import Attention

    def make(original):

        @functools.wraps(original)
        def get_kv_cache_spec(self, vllm_config):
            spec = original(self, vllm_config)
            if spec is None or not is_sparsemm(vllm_config):
                return spec
            return sparsemm_spec(spec, vllm_config, self.layer_name)

        return get_kv_cache_spec

    _wrap(Attention, "get_kv_cache_spec", make)


def sparsemm_spec(spec, vllm_config, layer_name: str):
    """``spec`` (a full-attention layer's) as a ``SparseMMSpec``; any other
    kind of layer stops start-up naming the model and the layer."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_sparsemm.engine.kv_spec import SparseMMSpec
    from vllm_sparsemm.engine.plan_setup import budget_plan, settings_for
    if type(spec) is not FullAttentionSpec:
        raise ValueError(
            f"the sparsemm attention backend cannot serve "
            f"{model_name(vllm_config.model_config)}: its layer {layer_name} "
            f"is {type(spec).__name__}, not full attention (sliding-window "
            f"or chunked layers keep no whole prompt to compress); choose "
            f"another --attention-backend")
    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    settings = settings_for(vllm_config)
    return SparseMMSpec(
        **fields, plan=budget_plan(vllm_config)[0],
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        admission_reserve=settings.admission_reserve,
        admission_pacing=settings.admission_pacing,
        async_scheduling=bool(vllm_config.scheduler_config.async_scheduling))


def sparsemm_builders(runner) -> list:
    """This runner's live sparsemm metadata builders (none when its engine
    runs another backend). Looked up at every call, never kept: vLLM builds
    a throwaway set while it profiles CUDA-graph memory, then clears it and
    builds the builders that serve."""
    from vllm_sparsemm.engine.backend import SparseMMMetadataBuilder
    return [builder for groups in getattr(runner, "attn_groups", ())
            for group in groups for builder in group.metadata_builders
            if isinstance(builder, SparseMMMetadataBuilder)]


def _budget_of(runner, req_id: str):
    """A request's own ``sparsemm_budget``, from the runner's copy of its
    sampling parameters."""
    from vllm_sparsemm.engine.request_options import request_budget
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    return request_budget(params.extra_args if params is not None else None)


def patch_runner_hooks() -> None:
    """Wraps V1 ``GPUModelRunner._build_attention_metadata`` (to hand the
    sparsemm builder each row's request id, prompt length and progress,
    which vLLM does not pass) and ``GPUModelRunner._update_states`` (to drop
    finished requests' worker state). Engines of other backends pass
    straight through."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sparsemm.engine.step_rows import StepRows

    def make_build(original):

        @functools.wraps(original)
        def _build_attention_metadata(self, num_tokens, num_reqs,
                                      max_query_len, *args, **kwargs):
            builders = sparsemm_builders(self)
            if builders:
                scheduled = kwargs.get("num_scheduled_tokens")
                full_graph = getattr(self, "_sparsemm_step_full_graph", False)
                rows = None
                if scheduled is not None and not kwargs.get(
                        "for_cudagraph_capture"):
                    batch = self.input_batch
                    req_ids = batch.req_ids[:num_reqs]
                    rows = StepRows(req_ids,
                                    batch.num_prompt_tokens[:num_reqs],
                                    batch.num_computed_tokens_cpu[:num_reqs],
                                    [scheduled[rid] for rid in req_ids],
                                    functools.partial(_budget_of, self))
                for builder in builders:
                    builder.hand_step(rows, full_graph)
            return original(self, num_tokens, num_reqs, max_query_len,
                            *args, **kwargs)

        return _build_attention_metadata

    def make_update(original):

        @functools.wraps(original)
        def _update_states(self, scheduler_output):
            finished = scheduler_output.finished_req_ids
            builders = sparsemm_builders(self) if finished else []
            if builders:
                blocks = {rid: self.requests[rid].block_ids[0]
                          for rid in finished if rid in self.requests}
                for builder in builders:
                    builder.state.finish(finished, blocks)
            return original(self, scheduler_output)

        return _update_states

    _wrap(GPUModelRunner, "_build_attention_metadata", make_build)
    _wrap(GPUModelRunner, "_update_states", make_update)


def patch_admission_inputs() -> None:
    """Wraps ``KVCacheManager.get_computed_blocks``, ``allocate_slots`` and
    ``free``, and ``Scheduler.schedule``: vLLM passes the per-type managers
    request ids only, and the sparsemm manager needs each request's prompt
    length (a prefix-cache hit must leave a compressed prompt's observation
    window to compute) and token limit (prompt + max_tokens, for the
    admission gate), the output length of each request that ran to its end
    (not preempted or aborted), from which the pacer learns how long
    requests live, and how many requests wait when a step is scheduled (the
    pacer stands aside when all of them fit) and which (their cached
    prompts are kept from eviction until they are admitted). A running
    request whose list already holds the slots it asks for skips vLLM's
    allocation, which would change nothing (``SparseMMManager.slots_ready``)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    from vllm_sparsemm.engine.kv_spec import SparseMMManager
    from vllm_sparsemm.engine.request_options import (request_budget,
                                                      runs_to_limit)

    def managers_of(kv_manager):
        managers = kv_manager.__dict__.get("_sparsemm_managers")
        if managers is None:  # called for every running request each step
            managers = kv_manager._sparsemm_managers = [
                m for m in kv_manager.coordinator.single_type_managers
                if isinstance(m, SparseMMManager)]
        return managers

    def note(kv_manager, request):
        managers = managers_of(kv_manager)
        for manager in managers:
            if not manager.is_noted(request.request_id):
                params = request.sampling_params
                manager.note_request(
                    request.request_id, request.num_prompt_tokens,
                    min(request.num_prompt_tokens + request.max_tokens,
                        kv_manager.max_model_len),
                    request_budget(params.extra_args if params else None),
                    runs_to_limit(params), request)
        return managers

    def make_lookup(original):

        @functools.wraps(original)
        def get_computed_blocks(self, request):
            for manager in note(self, request):
                manager.begin_lookup(request.request_id)
            return original(self, request)

        return get_computed_blocks

    running_call = {"num_lookahead_tokens"}  # how schedule() asks for one

    def make_allocate(original):

        @functools.wraps(original)
        def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
            managers = note(self, request)
            # a running request whose list already has the slots (most
            # decode steps past compaction): vLLM's four manager calls would
            # change nothing, and the scheduler pays them for every row
            if (not args and num_new_tokens > 0
                    and kwargs.keys() <= running_call
                    and request.status == RequestStatus.RUNNING
                    and len(managers) == 1 == len(
                        self.coordinator.single_type_managers)
                    and managers[0].slots_ready(request.request_id, min(
                        request.num_computed_tokens + num_new_tokens +
                        kwargs.get("num_lookahead_tokens", 0),
                        self.max_model_len))):
                return self.empty_kv_cache_blocks
            return original(self, request, num_new_tokens, *args, **kwargs)

        return allocate_slots

    def make_free(original):

        @functools.wraps(original)
        def free(self, request):
            if (request.is_finished()
                    and request.status != RequestStatus.FINISHED_ABORTED):
                for manager in managers_of(self):
                    manager.note_finished(request.request_id,
                                          request.num_output_tokens)
            return original(self, request)

        return free

    def make_schedule(original):

        @functools.wraps(original)
        def schedule(self, *args, **kwargs):
            waiting = len(self.waiting) + len(self.skipped_waiting)
            for manager in managers_of(self.kv_cache_manager):
                manager.note_waiting(waiting)
                # those that may run soon: at most a full batch
                manager.keep_waiting_hits(itertools.islice(
                    self.waiting, self.max_num_running_reqs))
            return original(self, *args, **kwargs)

        return schedule

    _wrap(KVCacheManager, "get_computed_blocks", make_lookup)
    _wrap(KVCacheManager, "allocate_slots", make_allocate)
    _wrap(KVCacheManager, "free", make_free)
    _wrap(Scheduler, "schedule", make_schedule)


_request_window: int | None = None  # this process's sparsemm engine's W


def patch_request_options() -> None:
    """Wraps ``SamplingParams._verify_args`` and
    ``InputProcessor._validate_params``: vLLM passes ``extra_args`` through
    unchecked, and sparsemm's per-request options (``request_options.py``)
    must fail as the client's error where vLLM checks sampling parameters:
    an HTTP 400 from the server, a ``ValueError`` offline. The first covers
    requests built once a sparsemm engine is configured in this process
    (the API server's), the second parameters built before it (offline)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_sparsemm.engine.request_options import check_request_options

    def make_verify(original):

        @functools.wraps(original)
        def _verify_args(self):
            original(self)
            if _request_window is not None:
                check_request_options(self.extra_args, _request_window)

        return _verify_args

    def make_validate(original):

        @functools.wraps(original)
        def _validate_params(self, params, *args, **kwargs):
            original(self, params, *args, **kwargs)
            if is_sparsemm(self.vllm_config) and isinstance(params,
                                                            SamplingParams):
                from vllm_sparsemm.engine.plan_setup import settings_for
                check_request_options(params.extra_args,
                                      settings_for(self.vllm_config).window)

        return _validate_params

    _wrap(SamplingParams, "_verify_args", make_verify)
    _wrap(InputProcessor, "_validate_params", make_validate)


def patch_full_graph_dispatch() -> None:
    """Wraps V1 ``GPUModelRunner._determine_batch_execution_and_padding``,
    which picks each step's CUDA-graph mode, for two reasons:

    - vLLM counts a step with one token per row as uniform decode even when a
      row is still in its prompt (a 1-token last chunk), and a replayed FULL
      graph would skip what such a row needs (window queries, selection,
      compaction). With ``full_cuda_graphs`` on, those steps pass
      ``use_cascade_attn=True``, which in this function only rules FULL out:
      they run piecewise.
    - The builder is not told the mode. It is recorded on the runner so that
      FULL steps, and only they, take graph_decode's fixed path (eager and
      piecewise decode steps keep plain FlashAttention for plain rows)."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):

        @functools.wraps(original)
        def _determine_batch_execution_and_padding(self, **kwargs):
            full_graphs = _full_graphs(self)
            if (full_graphs
                    and kwargs.get("force_uniform_decode") is None  # real step
                    and kwargs.get("max_num_scheduled_tokens") == 1
                    and rows_in_prompt(self.input_batch, kwargs["num_reqs"])):
                kwargs["use_cascade_attn"] = True
            result = original(self, **kwargs)
            self._sparsemm_step_full_graph = (
                full_graphs and result[0] == CUDAGraphMode.FULL)
            return result

        return _determine_batch_execution_and_padding

    _wrap(GPUModelRunner, "_determine_batch_execution_and_padding", make)


def _full_graphs(runner) -> bool:
    """Whether this runner's engine is sparsemm with ``full_cuda_graphs`` (read once)."""
    flag = getattr(runner, "_sparsemm_full_graphs", None)
    if flag is None:
        from vllm_sparsemm.engine.plan_setup import settings_for
        flag = runner._sparsemm_full_graphs = (
            is_sparsemm(runner.vllm_config)
            and settings_for(runner.vllm_config).full_cuda_graphs)
    return flag


def rows_in_prompt(input_batch, num_reqs: int) -> bool:
    """Whether a row of the batch still computes prompt tokens this step."""
    computed = input_batch.num_computed_tokens_cpu[:num_reqs]
    return bool((computed < input_batch.num_prompt_tokens[:num_reqs]).any())


def park_released_prompts(block_pool) -> "ParkingBlockPool":
    """Make a sparsemm engine's ``BlockPool`` a :class:`ParkingBlockPool`
    (its manager calls this when prefix caching is on)."""
    if not isinstance(block_pool, ParkingBlockPool):
        assert type(block_pool) is BlockPool, type(block_pool)
        block_pool.__class__ = ParkingBlockPool
        block_pool.parked = {}  # block id -> (block, owner), in parking order
        block_pool.parked_by = {}  # owner -> {block id: block}, prompt order
    return block_pool


class ParkingBlockPool(BlockPool):
    """vLLM's ``BlockPool`` with a second tier of free blocks: the prompt
    blocks a compressed request gave back when it compacted, parked while it
    runs. They count as free, so every admission and preemption is decided
    as before, and keep their hashes, but are handed out only once the free
    queue runs short: the most recently parked first, a prompt's last block
    first. When the request ends they join the queue, as stock vLLM frees a
    request's blocks. Stock vLLM holds a running request's prompt and so
    never evicts it; without the tier, the cache's LRU order evicted the
    prompts of conversations that outgrew the pool, each one before its
    next turn. A waiting request's cached prompt blocks are parked too,
    until it is admitted (``SparseMMManager.keep_waiting_hits``).

    Replaces ``BlockPool.get_num_free_blocks`` (adds the parked),
    ``get_new_blocks`` (unparks what the queue lacks first) and ``touch``
    (a hit on a parked block takes it out of the tier)."""

    def park(self, blocks, owner: str) -> None:
        """Take ``blocks`` (a prompt's, in order) that are free and hashed
        out of the free queue into the tier."""
        mine = self.parked_by.setdefault(owner, {})
        for block in blocks:
            if (block.ref_cnt == 0 and block.block_hash is not None
                    and not block.is_null and block.block_id not in self.parked):
                self.free_block_queue.remove(block)
                self.parked[block.block_id] = (block, owner)
                mine[block.block_id] = block

    def unpark(self, owner: str) -> None:
        """``owner`` ended: its parked blocks join the free queue, its
        prompt's last block to be evicted first."""
        blocks = [block for block in reversed(
            self.parked_by.pop(owner, {}).values())
            if self.parked.pop(block.block_id, None) is not None]
        self.free_block_queue.append_n(blocks)

    def _release(self, count: int) -> None:
        """Return the ``count`` most recently parked blocks to the queue."""
        blocks = []
        for _ in range(min(count, len(self.parked))):
            block_id, (block, owner) = self.parked.popitem()
            del self.parked_by[owner][block_id]
            blocks.append(block)
        self.free_block_queue.append_n(blocks)

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks + len(self.parked)

    def get_new_blocks(self, num_blocks: int):
        self._release(num_blocks - self.free_block_queue.num_free_blocks)
        return super().get_new_blocks(num_blocks)

    def touch(self, blocks) -> None:
        for block in blocks:
            parked = self.parked.pop(block.block_id, None)
            if parked is not None:
                del self.parked_by[parked[1]][block.block_id]
                self.free_block_queue.append(block)
        super().touch(blocks)


def patch_metrics_registry() -> None:
    """Wraps ``vllm.v1.metrics.prometheus.get_prometheus_registry``: with
    several API servers (``--api-server-count``) ``/metrics`` serves a fresh
    registry of Prometheus' multiprocess files only, which lacks the merged
    files sparsemm's processes write (``metrics.serve_in``). The instrumentator
    module binds the name at import, so a binding made before this patch is
    replaced too."""
    from vllm.v1.metrics import prometheus

    from vllm_sparsemm.engine import metrics

    def make(original):
        @functools.wraps(original)
        def get_prometheus_registry():
            registry = original()
            metrics.serve_in(registry)
            return registry
        return get_prometheus_registry

    _wrap(prometheus, "get_prometheus_registry", make)
    served = sys.modules.get("vllm.entrypoints.serve.instrumentator.metrics")
    if served is not None:
        _wrap(served, "get_prometheus_registry",
              lambda _: prometheus.get_prometheus_registry)


def patch_environment_check() -> None:
    """Wraps ``vllm.envs.validate_environ``: vLLM warns about every
    ``VLLM_*`` variable missing from its table, in every process, and
    refuses to start on one under ``--fail-on-environ-validation``. The
    check now knows sparsemm's own (a misspelt one is still caught). They
    join vLLM's table for the check only: left there, they would enter
    torch.compile's cache key (``envs.compile_factors``) of every engine."""
    from vllm import envs

    from vllm_sparsemm.engine import metrics
    from vllm_sparsemm.engine.config import setting_environment_names
    ours = {*setting_environment_names(), metrics.ENV,
            "VLLM_SPARSEMM_BUILD_CUDA"}  # the last is setup.py's

    def make(original):

        @functools.wraps(original)
        def validate_environ(hard_fail: bool) -> None:
            table = envs.environment_variables
            added = [name for name in ours if name not in table]
            table.update((name, lambda: None) for name in added)
            try:
                original(hard_fail)
            finally:
                for name in added:
                    del table[name]

        return validate_environ

    _wrap(envs, "validate_environ", make)


def apply_all() -> None:
    patch_environment_check()
    patch_backend_name()
    patch_engine_config()
    patch_model_runner_choice()
    patch_packed_kv_layout()
    patch_layer_spec()
    patch_runner_hooks()
    patch_admission_inputs()
    patch_request_options()
    patch_full_graph_dispatch()
    patch_metrics_registry()
