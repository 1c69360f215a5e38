"""The Triton kernels against their PyTorch references: the page table on the
compressed rows of real CPU-engine steps, the K/V write on vLLM-shaped strided
views. Through Triton's interpreter on the CPU, compiled on the GPU."""

import contextlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def compare_on_engine_steps(device: str) -> int:
    """Drive the CPU engine into mixed prefill/decode steps; compare every layer's
    page table from the kernel with the reference. Returns tables compared."""
    sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
    from cpu_engine import Engine

    from vllm_sparsemm.engine import backend
    from vllm_sparsemm.kernels import triton_ops
    from vllm_sparsemm.engine.layer_ops import compressed_page_table, page_table_width

    compared = 0
    build = backend.build_step

    def checking_build(state, *args):
        nonlocal compared
        plan = build(state, *args)
        cr = plan.compressed if plan is not None else None
        if cr is not None:
            moved = _to_device(cr, device)
            for layer in range(state.num_layers):
                expected = compressed_page_table(cr, state, layer)
                # room past the end; the wide table spans column blocks
                for extra in (3, 300 if layer == 0 else 3):
                    width = page_table_width(cr, state) + extra
                    got = triton_ops.page_table(moved, state, layer,
                                                width).cpu()
                    assert torch.equal(got[:, :expected.shape[1]], expected)
                    assert not got[:, expected.shape[1]:].any()
                compared += 1
        return plan

    backend.build_step = checking_build
    try:
        eng = Engine(num_blocks=300)
        plans = eng.add_all({"a": 300, "b": 180, "c": 30, "d": 97}, 64, 20,
                            tail=[3, 2])
        for _ in eng.run(plans):
            pass
    finally:
        backend.build_step = build
    return compared


def _to_device(cr, device):
    import dataclasses
    fields = {f.name: getattr(cr, f.name) for f in dataclasses.fields(cr)}
    return dataclasses.replace(cr, **{
        k: v.to(device) for k, v in fields.items() if isinstance(v, torch.Tensor)})


def compare_write_kv(device: str) -> int:
    """``triton_ops.write_kv`` against ``kv_ops.write_rows`` of the ``cat``:
    bit for bit, rows not written untouched. Returns cases compared."""
    from vllm_sparsemm.kernels import triton_ops
    from vllm_sparsemm.kernels.kv_ops import write_rows

    compared = 0
    gen = torch.Generator().manual_seed(0)
    for heads, dim, group, dtype in ((2, 64, 1, torch.float16),
                                     (4, 80, 7, torch.bfloat16)):
        tokens = 9
        # vLLM's key and value: strided views of the fused QKV output
        qkv = torch.randn(tokens, (heads * group + 2 * heads) * dim,
                          generator=gen).to(dtype).to(device)
        q_width = heads * group * dim
        key = qkv[:, q_width:q_width + heads * dim].view(tokens, heads, dim)
        value = qkv[:, q_width + heads * dim:].view(tokens, heads, dim)
        for picked in (None, torch.tensor([7, 0, 3, 4])):
            n = tokens if picked is None else len(picked)
            rows = torch.randn(200, 2 * dim, generator=gen).to(dtype).to(device)
            dst = torch.randperm(200, generator=gen)[:n * heads].to(device)
            want = rows.clone()
            chosen = slice(None) if picked is None else picked.to(device)
            kv = torch.cat([key[chosen], value[chosen]], dim=-1)
            write_rows(want, dst, kv.flatten(0, 1))
            triton_ops.write_kv(rows, dst, key, value,
                                None if picked is None else picked.to(device))
            assert torch.equal(rows.view(torch.int16), want.view(torch.int16))
            compared += 1
    return compared


FP8_SCALES = (0.5, 2.0, 0.25)  # (k, v, q): none is 1, so a missed one shows


def _fp8_scales(device, layers: int = 1) -> torch.Tensor:
    """Each layer's ``(k, v, q)`` scales as ``WorkerKVState.kv_scales``
    holds them (layer l's times 1 + l: per-layer scales must be told apart)."""
    base = torch.tensor(FP8_SCALES)
    return torch.stack([base * (1 + l) for l in range(layers)]).to(device)


def compare_write_kv_fp8(device: str) -> int:
    """``triton_ops.write_kv`` into an fp8 cache against ``kv_ops.write_rows``
    with the layer's scales: the same bytes (divide, saturate, round to
    nearest even), values past fp8's range included. Returns cases."""
    from vllm_sparsemm.kernels import triton_ops
    from vllm_sparsemm.kernels.kv_ops import FP8_KV_DTYPE, write_rows

    compared = 0
    gen = torch.Generator().manual_seed(2)
    scales = _fp8_scales(device)[0]
    for heads, dim, dtype in ((2, 64, torch.float16), (4, 80, torch.bfloat16)):
        tokens = 9
        kv = (torch.randn(tokens, 2 * heads, dim, generator=gen) * 60).to(dtype)
        kv[0, 0, 0] = 1000.0  # saturates at 448 x scale
        if device == "cuda":  # stays NaN (debug_poison's rows); Triton
            kv[1, 0, 1] = float("nan")  # 3.6's interpreter writes NaN as 384
        kv = kv.to(device)
        key, value = kv[:, :heads], kv[:, heads:]
        rows = torch.zeros(100, 2 * dim, dtype=torch.uint8,
                           device=device).view(FP8_KV_DTYPE)
        dst = torch.randperm(100, generator=gen)[:tokens * heads].to(device)
        want = rows.clone()
        write_rows(want, dst, torch.cat([key, value], -1).flatten(0, 1),
                   (scales[0], scales[1]))
        triton_ops.write_kv(rows, dst, key, value, None, scales)
        assert torch.equal(rows.view(torch.uint8), want.view(torch.uint8))
        compared += 1
    return compared


def compare_paged_decode_fp8(device: str) -> int:
    """``triton_ops.paged_decode`` over fp8 pages against
    ``paged_attention_reference`` with the same scales: fp8 queries (vLLM
    quantizes them for an fp8 cache) and 16-bit ones, one and several
    splits. Returns cases compared."""
    from vllm_sparsemm.kernels import triton_ops
    from vllm_sparsemm.kernels.kv_ops import (FP8_KV_DTYPE,
                                              paged_attention_reference,
                                              to_cache)

    compared = 0
    gen = torch.Generator().manual_seed(3)
    scales = _fp8_scales(device)[0]
    k_scale, v_scale, q_scale = FP8_SCALES
    for kv_heads, group, dim, fp8_query in ((2, 4, 64, True),
                                            (3, 7, 80, True),
                                            (2, 1, 128, False)):
        rows, block_size, num_pages = 4, 16, 120
        sequences = rows * kv_heads
        pages = torch.cat([
            to_cache(torch.randn(num_pages, block_size, dim, generator=gen),
                     FP8_KV_DTYPE, k_scale),
            to_cache(torch.randn(num_pages, block_size, dim, generator=gen),
                     FP8_KV_DTYPE, v_scale)], dim=-1)
        lengths = torch.randint(1, 90, (sequences, ), generator=gen,
                                dtype=torch.int32)
        lengths[1] = 200
        width = 200 // block_size + 1
        table = torch.randint(1, num_pages, (sequences, width), generator=gen,
                              dtype=torch.int32)
        query = torch.randn(rows, kv_heads * group, dim, generator=gen)
        query = (to_cache(query, FP8_KV_DTYPE, q_scale) if fp8_query else
                 query.to(torch.float16))
        starts = torch.arange(sequences + 1, dtype=torch.int32)
        want = paged_attention_reference(
            query.reshape(sequences, group, dim), pages[..., :dim],
            pages[..., dim:], table, lengths, starts, dim**-0.5,
            scales=(k_scale, v_scale, q_scale), out_dtype=torch.float32)
        for splits in (1, 3):
            out = torch.full((rows, kv_heads * group, dim), float("nan"),
                             dtype=torch.float16, device=device)
            triton_ops.paged_decode(query.to(device), pages.to(device),
                                    table.to(device), lengths.to(device),
                                    dim**-0.5, out, num_splits=splits,
                                    scales=scales)
            # exact fp8 inputs widened to fp16, P in fp16 as in the 16-bit
            # case, outputs ~v_scale in size and rounded to fp16
            torch.testing.assert_close(
                out.cpu().float().view(sequences, group, dim), want,
                atol=4e-3, rtol=1e-2)
            compared += 1
    return compared


def compare_paged_decode(device: str) -> int:
    """``triton_ops.paged_decode`` against ``paged_attention_reference``: MHA
    and GQA, head dims 64/80/128, fp16 (and bf16 on the GPU), one and several
    key splits, short and long heads and an empty one, on vLLM's strided
    query. Returns cases compared."""
    from vllm_sparsemm.kernels import triton_ops
    from vllm_sparsemm.kernels.kv_ops import paged_attention_reference

    compared = 0
    gen = torch.Generator().manual_seed(1)
    cases = [(2, 1, 128, torch.float16), (3, 7, 80, torch.float16),
             (2, 4, 64, torch.float16)]
    if device != "cpu":  # Triton's interpreter gets tl.dot of bf16 wrong
        cases.append((3, 7, 80, torch.bfloat16))  # (garbage for a 16x16 product)
    for kv_heads, group, dim, dtype in cases:
        rows, block_size, num_pages = 5, 16, 200
        sequences = rows * kv_heads
        pages = torch.randn(num_pages, block_size, 2 * dim,
                            generator=gen).to(dtype).to(device)
        lengths = torch.randint(1, 90, (sequences, ), generator=gen,
                                dtype=torch.int32)
        lengths[1], lengths[-1] = 300, 0  # a long head; padding holds none
        width = 300 // block_size + 1
        table = torch.randint(1, num_pages, (sequences, width), generator=gen,
                              dtype=torch.int32)
        qkv = torch.randn(rows, (kv_heads * group + 2 * kv_heads) * dim,
                          generator=gen).to(dtype)
        query = qkv[:, :kv_heads * group * dim].view(rows, -1, dim).to(device)
        starts = torch.arange(sequences + 1, dtype=torch.int32)
        want = paged_attention_reference(
            query.cpu().reshape(sequences, group, dim), pages.cpu()[..., :dim],
            pages.cpu()[..., dim:], table, lengths, starts, dim**-0.5)
        want[-1] = 0  # no keys: the kernel writes zeros
        for splits in (1, 3, 16):  # 16: most of a short head's parts are empty
            out = torch.full((rows, kv_heads * group, dim), float("nan"),
                             dtype=dtype, device=device)
            triton_ops.paged_decode(query, pages, table.to(device),
                                    lengths.to(device), dim**-0.5, out,
                                    num_splits=splits)
            # 16-bit inputs and P, fp32 softmax and sums in both; the output
            # rounds to fp16 (~1e-3) or bf16 (~8e-3)
            atol = 2e-3 if dtype == torch.float16 else 1.6e-2
            torch.testing.assert_close(
                out.cpu().view(sequences, group, dim), want, atol=atol,
                rtol=1e-2 if dtype == torch.float16 else 2e-2)
            compared += 1
    return compared


def compare_plan_decode_fp8(device: str) -> int:
    """:func:`compare_plan_decode` over an fp8 cache with fp8 queries."""
    return compare_plan_decode(device, "fp8")


def compare_plan_decode(device: str, kv_cache_dtype: str = "auto") -> int:
    """``triton_ops.paged_decode`` reading the pages straight from the step
    plan (no table) against the CPU backend's own attention output, in the
    decode steps of the CPU engine (compacted heads, growing pages, several
    requests), after each layer wrote its new K/V, on both the per-step and
    the full-graph fixed path. Returns the (step, layer, split) cases."""
    sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
    import cpu_engine
    from cpu_engine import Engine

    from vllm_sparsemm.engine import backend
    from vllm_sparsemm.kernels import triton_ops

    compared, budget, every = 0, 30, 3
    attend = backend.SparseMMImpl._compressed_attention

    def checking_attention(self, plan, index, query, output):
        nonlocal compared
        attend(self, plan, index, query, output)
        cr, state = plan.compressed, plan.state
        if max(cr.query_lens) > 1 or index % every or compared >= budget:
            return  # decode rows only, some layers: the interpreter is slow
        rows = [i for i, n in enumerate(cr.lengths[index].view(
            len(cr.rows), -1).amin(1).tolist()) if n > 0]  # padding has no keys
        moved, pages = _to_device(cr, device), state.pages.to(device)
        scales = state.scales(index)
        scales = None if scales is None else scales.to(device)
        for splits in (1, 3):
            out = torch.full_like(query[cr.tokens], float("nan"),
                                  dtype=output.dtype).to(device)
            triton_ops.paged_decode(
                query[cr.tokens].to(device), pages, None, moved.lengths[index],
                self.scale, out, num_splits=splits, plan=(moved, index, state),
                scales=scales)
            # float32 pages and products in both
            torch.testing.assert_close(out.cpu()[rows], output[cr.tokens][rows],
                                       atol=1e-4, rtol=1e-4)
            compared += 1

    backend.SparseMMImpl._compressed_attention = checking_attention
    dim, precision = cpu_engine.DIM, None
    if device == "cuda":  # compiled dots need K >= 16; fp32 ones in IEEE,
        import triton     # as the reference's (not TF32)
        cpu_engine.DIM, precision = 16, triton.knobs.language.fp32_default
        triton.knobs.language.fp32_default = "ieee"
    try:
        eng = Engine(num_blocks=300, kv_cache_dtype=kv_cache_dtype)
        plans = eng.add_all({"a": 300, "b": 180, "c": 30, "d": 97}, 64, 20)
        for _ in eng.run(plans):
            pass
        # graph_decode's fixed path: the uncompressed "b" on the identity
        # plan, rows padded to 5 and 8, page tables as wide as max_model_len
        eng, budget, every = Engine(full_graphs=True,
                                    kv_cache_dtype=kv_cache_dtype), \
            compared + 18, 1
        plans = eng.add_all({"a": 100, "b": 30, "c": 71}, 64, 3)
        prompts = {rid: plan[:-3] for rid, plan in plans.items()}
        for _ in eng.run(prompts):
            pass
        for pad_to in (0, 5, 8):
            schedule = {rid: 1 for rid in plans}
            eng.step(schedule, pad_to=pad_to)
            eng.processed(schedule)
        assert eng.last_plan.compressed.max_length == 4096  # the fixed path ran
    finally:
        backend.SparseMMImpl._compressed_attention = attend
        cpu_engine.DIM = dim
        if device == "cuda":
            triton.knobs.language.fp32_default = precision
    return compared


@contextlib.contextmanager
def _backend_branches(kernels: bool):
    """``kernels``: the backend takes its Triton branches, as on a GPU
    (FlashAttention and the CUDA compaction keep their references); else
    its reference branches, as on a CPU."""
    from vllm_sparsemm.engine import backend
    from vllm_sparsemm.kernels import triton_ops
    runs_on, sm_count = triton_ops.runs_on, backend.sm_count
    if kernels:
        triton_ops.runs_on = lambda where: True
        backend.sm_count = lambda device: 4  # few SMs: decode splits keys
    try:
        yield
    finally:
        triton_ops.runs_on, backend.sm_count = runs_on, sm_count


def _engine_run(kernels: bool, kv_cache_dtype: str, debug_poison: bool,
                full_graphs: bool = False,
                decode_kernel: str = "triton") -> tuple[dict, int]:
    """One CPU-engine workload (a mixed batch of chunked prompts, decode and
    multi-token steps; with ``full_graphs`` padded uniform decode on the
    fixed path) on the backend's kernel or reference branches, every output
    checked against dense SparseMM. Returns each layer's recorded selection
    and the steps run."""
    from cpu_engine import Engine
    with _backend_branches(kernels):
        eng = Engine(kv_cache_dtype=kv_cache_dtype, debug_poison=debug_poison,
                     full_graphs=full_graphs)
        for rank in eng.ranks:
            rank.impl.decode_kernel = decode_kernel
        eng.state.recorded = {}
        prompts = {"a": 100, "b": 30, "c": 71, "d": 49, "e": 171}
        plans = eng.add_all(prompts, 13, 12, tail=[] if full_graphs else [3])
        steps = 0
        for _, tokens, outputs in eng.run(plans):
            eng.check(tokens, outputs)
            steps += 1
        if full_graphs:
            assert eng.last_plan.compressed.max_length == eng.max_model_len
    return eng.state.recorded, steps


def _conversation_run(kernels: bool, kv_cache_dtype: str) -> dict:
    """test_prefix_caching's conversation (prefix-cache hits whose keys the
    selection reads from cached blocks) over two tensor-parallel ranks, on
    the kernel or reference branches; outputs checked against dense
    SparseMM. Returns rank 0's recorded selections."""
    sys.path.insert(0, str(HERE.parent / "engine"))
    from test_prefix_caching import _conversation
    with _backend_branches(kernels):
        eng, hits = _conversation(caching=True, record=True, tp=2,
                                  kv_cache_dtype=kv_cache_dtype)
    assert hits["repeat"] > 0 and hits["second turn"] > 0
    return eng.state.recorded


def _assert_same_selections(got: dict, want: dict, requests: int) -> None:
    """Every layer's recorded queries and keys (as scored), kept positions
    and counts are the same."""
    assert got.keys() == want.keys() and len(want) == requests
    for rid, layers in want.items():
        for layer, (queries, keys, kept, counts) in layers.items():
            q, k, p, c = got[rid][layer]
            assert torch.equal(q, queries) and torch.equal(k, keys)
            assert torch.equal(c, counts) and torch.equal(p, kept)


def engine_on_kernels(device: str, kv_cache_dtype: str = "auto") -> int:
    """The backend on its Triton branches (write, in-place selection,
    decode from the plan and from a page table, page tables for
    FlashAttention's decode, long prompts streamed, the full-graph path,
    prefix-cache hits on two tensor-parallel ranks) against its reference
    branches: outputs equal dense
    SparseMM in both, and every layer's recorded selection (queries and
    keys as scored, kept positions, counts) is the same. The CPU engine
    only: ``device`` is "cpu". Returns the steps run on the kernels."""
    assert device == "cpu"
    sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
    from vllm_sparsemm.engine import layer_ops, step_plan
    steps = 0
    for poison, graphs, tokens, decoders in (
            (False, False, None, ("triton", "flash_attn")),
            (True, False, 64, ("triton", )), (False, True, None, ("triton", ))):
        bound = layer_ops.SELECTION_TOKENS, step_plan.SELECTION_TOKENS
        if tokens:  # prompts past a pass's bound: the streamed selection
            layer_ops.SELECTION_TOKENS = step_plan.SELECTION_TOKENS = tokens
        try:
            want, _ = _engine_run(False, kv_cache_dtype, poison, graphs)
            for decoder in decoders:
                got, ran = _engine_run(True, kv_cache_dtype, poison, graphs,
                                       decoder)
                _assert_same_selections(got, want, 4)
                steps += ran
        finally:
            layer_ops.SELECTION_TOKENS, step_plan.SELECTION_TOKENS = bound
    _assert_same_selections(_conversation_run(True, kv_cache_dtype),
                            _conversation_run(False, kv_cache_dtype), 4)
    return steps


def engine_on_kernels_fp8(device: str) -> int:
    """:func:`engine_on_kernels` over an fp8 cache with per-layer scales."""
    return engine_on_kernels(device, "fp8")


_NUMPY_SCALAR_ERROR = "error::DeprecationWarning:triton.runtime.interpreter"


def _in_triton_interpreter(comparison: str) -> int:
    """Run ``comparison('cpu')`` of this module under Triton's interpreter
    (a fresh process: the flag is read at import) and return its count."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path[:0] = [%r, %r]; import test_triton_ops as t; "
            "print('compared', t.%s('cpu'))" % (str(HERE), str(HERE.parent),
                                              comparison))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="1",
                                   # NumPy >= 2.4 raises where older ones warn
                                   PYTHONWARNINGS=_NUMPY_SCALAR_ERROR),
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("compared")[-1])


# each comparison of this module and the cases it covers
INTERPRETED = {"compare_write_kv": 4, "compare_paged_decode": 9,
               "compare_plan_decode": 48, "compare_window_means": 6,
               "compare_write_kv_fp8": 2, "compare_paged_decode_fp8": 6,
               "compare_plan_decode_fp8": 48, "compare_window_means_fp8": 6}


@pytest.mark.parametrize("comparison", sorted(INTERPRETED))
def test_kernel_equals_its_reference_in_triton_interpreter(comparison):
    assert _in_triton_interpreter(comparison) == INTERPRETED[comparison]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("comparison", sorted(INTERPRETED))
def test_kernel_equals_its_reference_on_gpu(comparison):
    # on the GPU the decode comparison adds the bf16 cases
    cases = {"compare_paged_decode": 12}.get(comparison,
                                            INTERPRETED[comparison])
    assert globals()[comparison]("cuda") == cases


@pytest.mark.parametrize("run", ["engine_on_kernels", "engine_on_kernels_fp8"])
def test_backend_on_its_kernels_in_triton_interpreter(run):
    """The GPU's branches of the whole backend, end to end, on the CPU."""
    assert _in_triton_interpreter(run) == 107


def test_page_table_kernel_in_triton_interpreter():
    assert _in_triton_interpreter("compare_on_engine_steps") > 50


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_paged_decode_builds_once_whatever_its_index_views_offsets():
    """A step's index tensors are views into one upload, at offsets the
    step's sizes set: the kernel must not be built again for each alignment
    (a build mid-run stalls a step)."""
    from triton.runtime import driver

    from vllm_sparsemm.kernels import triton_ops
    rows, heads, dim, width = 2, 4, 128, 3
    sequences = rows * heads
    pages = torch.randn(64, 16, 2 * dim, device="cuda", dtype=torch.float16)
    query = torch.randn(rows, heads, dim, device="cuda", dtype=torch.float16)
    tables = torch.randint(1, 64, (sequences * width + 3, ), device="cuda",
                           dtype=torch.int32)
    lengths = torch.randint(1, 48, (sequences + 3, ), device="cuda",
                            dtype=torch.int32)
    out = torch.empty_like(query)
    builds = triton_ops._decode_kernel.device_caches[
        driver.active.get_current_device()][0]
    for offset in range(4):  # int32 views 0, 4, 8 and 12 bytes in
        table = tables[offset:offset + sequences * width].view(sequences, width)
        triton_ops.paged_decode(query, pages, table,
                                lengths[offset:offset + sequences], dim**-0.5,
                                out)
        if offset == 0:
            first = len(builds)
    torch.cuda.synchronize()
    assert len(builds) == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_page_table_kernel_on_gpu():
    assert compare_on_engine_steps("cuda") > 50


def _loops(sass: str) -> list[list[str]]:
    """The SASS of every loop: from a label to a later branch back to it."""
    lines, labels, loops = sass.splitlines(), {}, []
    for i, line in enumerate(lines):
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = i
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if target and target.group(1) in labels and i - labels[target.group(1)] > 1:
            loops.append(lines[labels[target.group(1)]:i])
    return loops


@pytest.mark.parametrize("dim, group, split, from_plan, fp8", [
    (128, 1, False, False, False), (128, 1, True, False, False),
    (128, 1, False, True, False), (80, 7, False, True, False),
    (64, 4, True, False, False), (128, 4, False, True, True),
    (80, 7, True, False, True)])
def test_paged_decode_compiles_for_sm90_without_spills(dim, group, split,
                                                      from_plan, fp8,
                                                      tmp_path):
    """The GPU branch of the decode kernel (the for loop, which the
    interpreter cannot run) compiled ahead of time for an H100/H200 with
    Triton's own ptxas: it must build, keep its registers (a spill to local
    memory would cost the kernel its bandwidth) and stream K and V in with
    pipelined 16-byte asynchronous copies; with an fp8 cache (and fp8
    queries) too."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_sparsemm.kernels import triton_ops

    plan_ptrs = ("prefix_pages_ptr", "prefix_start_ptr", "decode_base_ptr",
                 "kept_ptr", "prompt_ptr")
    signature = {}
    for name in triton_ops._decode_kernel.arg_names:
        signature[name] = (
            "constexpr" if name.isupper() else
            "*fp8e4nv" if fp8 and name in ("q_ptr", "pages_ptr") else
            "*fp16" if name in ("q_ptr", "pages_ptr", "out_ptr") else
            "*fp32" if name in ("part_ptr", "scales_ptr") else
            ("*i64" if from_plan else "*i32") if name in plan_ptrs else
            "*i32" if name.endswith("_ptr") else
            "fp32" if name == "scale" else "i32")
    # the backend's launch configuration (paged_decode's defaults)
    defaults = inspect.signature(triton_ops.paged_decode).parameters
    warps = defaults["num_warps"].default
    constants = {"G_PAD": max(16, triton.next_power_of_2(group)),
                 "BLOCK_D": triton.next_power_of_2(dim), "BS": 16,
                 "SPLIT": split, "FROM_PLAN": from_plan, "INTERPRET": False,
                 "NUM_STAGES": defaults["num_stages"].default, "QUANT": fp8}
    # what Triton's launcher sees for the backend's tensors: 16-byte aligned
    # pointers and strides divisible by 16 (it specializes on both), except
    # the index pointers, whose alignment it is told to ignore
    names = list(signature)
    ignored = triton_ops._decode_kernel.do_not_specialize_on_alignment
    aligned = [n for n in names if n.endswith(("_ptr", "_stride"))
               and n not in ignored] + ["dim"]
    attrs = {(names.index(n), ): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(
        ASTSource(fn=triton_ops._decode_kernel, signature=signature,
                  constexprs=constants, attrs=attrs),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert "mma.sync" in kernel.asm["ptx"]  # both products on tensor cores
    tools = Path(triton.__file__).parent / "backends/nvidia/bin"
    if not (tools / "cuobjdump").exists() or not (tools / "nvdisasm").exists():
        pytest.skip("Triton's cuobjdump / nvdisasm are not installed")
    cubin = tmp_path / "decode.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage",
                            str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    assert "LOCAL:0 " in usage, usage
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)],
                          capture_output=True, text=True, check=True).stdout
    # At 2 warps the plan mode keeps two values on an 8-byte stack (stored
    # before the page loop, loaded after it); a spill inside the loop would
    # cost every page
    loops = _loops(sass)
    assert loops, "no page loop found in the SASS"
    spilled = [line for loop in loops for line in loop
               if re.search(r"\b(STL|LDL)\b", line)]
    assert not spilled, spilled
    # K and V stream in through asynchronous 16-byte copies, pipelined
    assert "LDGSTS.E.BYPASS.128" in sass or "LDGSTS.E.128" in sass, sorted(
        set(re.findall(r"LDG\S*", sass)))


def test_decode_splits_spread_few_heads_and_leave_many_whole():
    """The Triton kernel's split rule, with an H200's 132 SMs: the cases it
    was set from and its bounds."""
    from vllm_sparsemm.engine.backend import triton_decode_splits
    sms = 132
    assert triton_decode_splits(26 * 32, sms) == 6  # 8 GiB, B=256: 26 rows
    assert triton_decode_splits(755 * 32, sms) == 1  # LLaVA-1.5, whole H200
    assert triton_decode_splits(32, sms) == 16  # batch 1: at most 16 parts
    counts = [triton_decode_splits(n, sms) for n in range(1, 6000)]
    assert counts == sorted(counts, reverse=True)  # fewer as heads grow


def compare_window_means_fp8(device: str) -> int:
    """:func:`compare_window_means` over an fp8 cache."""
    return compare_window_means(device, fp8=True)


def compare_window_means(device: str, fp8: bool = False) -> int:
    """``triton_ops.window_means`` against ``selection.window_means`` over
    keys gathered from the same packed cache: MHA and GQA (up to 72 grouped
    window rows: two query blocks), head dims 64 and 80, prompts of several
    lengths (one exactly W + 1), a pass of two layers, fp16 (fp32 on the
    CPU, where the interpreter computes). The kernel sums in another order,
    so values agree to float32 rounding, not bit for bit. ``fp8``: an fp8
    cache and fp8 window queries, the two layers' scales unlike, against
    the reference on dequantized ones (the kernel's fp8 products are exact,
    its scales applied after the sums). Returns cases compared."""
    from vllm_sparsemm.core.pages import PageSpace, standard_row
    from vllm_sparsemm.core.selection import window_means
    from vllm_sparsemm.kernels import triton_ops
    from vllm_sparsemm.kernels.kv_ops import FP8_KV_DTYPE, from_cache, to_cache

    compared = 0
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    block_size, num_layers, num_blocks, window = 16, 3, 40, 8
    scales = _fp8_scales(device, num_layers) if fp8 else None

    def stored(*shape):  # random values as the cache (or the layer) holds them
        values = torch.randn(*shape, generator=gen)
        return (to_cache(values, FP8_KV_DTYPE, 1.0) if fp8 else
                values.to(dtype)).to(device)

    for kv_heads, group, dim, lengths in ((2, 1, 64, [40, 9, 33]),
                                          (2, 4, 80, [70, 25]),
                                          (1, 9, 64, [30, 90])):  # GW > 64
        space = PageSpace(num_layers, num_blocks, kv_heads, block_size)
        rows = stored(num_blocks * num_layers * kv_heads * block_size, 2 * dim)
        longest = max(lengths)
        columns = -(-longest // block_size)
        blocks = torch.randperm(num_blocks, generator=gen)[
            :len(lengths) * columns].view(len(lengths), columns)
        blocks = blocks.to(torch.int32).to(device)
        lens = torch.tensor(lengths, device=device)
        first, layers = 1, 2
        queries = stored(layers * len(lengths), window, kv_heads * group, dim)
        got = triton_ops.window_means(queries, rows, blocks, lens, first,
                                      num_layers, kv_heads, block_size,
                                      longest, scales)
        positions = torch.arange(longest, device=device).clamp(
            max=lens[:, None] - 1)  # [b, N]: padded with each last position
        heads = torch.arange(kv_heads, device=device)
        for at, layer in enumerate(range(first, first + layers)):
            block = blocks.long().gather(1, positions // block_size)[..., None]
            keys = rows[standard_row(space, block, layer, heads,
                                     positions[..., None]), :dim]
            part = slice(at * len(lengths), (at + 1) * len(lengths))
            k_scale, _, q_scale = scales[layer] if fp8 else (None, ) * 3
            want = window_means(from_cache(queries[part], q_scale),
                                from_cache(keys, k_scale), lens)
            torch.testing.assert_close(got[part], want, rtol=1e-4, atol=1e-6)
            compared += 1
    return compared


def _compile_for_hopper(kernel, pointers: dict, constants: dict):
    """Compile ``kernel`` for sm_90 without a GPU (Triton's own ptxas): the
    path the interpreter does not take (``range`` to a loaded bound, tl.dot
    on fp16) must build."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constants else
                 pointers.get(name, "fp32" if name == "scale" else "i32")
                 for name in names}
    signature["scales_ptr"] = "*fp32"
    source = ASTSource(fn=kernel, signature=signature, constexprs={
        (names.index(name), ): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


@pytest.mark.parametrize("group, dim, fp8", [(1, 128, False), (7, 80, False),
                                             (4, 128, True)])
def test_window_kernels_compile_for_hopper(group, dim, fp8):
    pytest.importorskip("triton")
    from vllm_sparsemm.kernels import triton_ops
    cache = "*fp8e4nv" if fp8 else "*fp16"
    pointers = {"q_ptr": cache, "rows_ptr": cache, "blocks_ptr": "*i32",
                "lengths_ptr": "*i64", "lse_ptr": "*fp32", "out_ptr": "*fp32"}
    grouped = group * 32
    sizes = dict(WINDOW=32, GW=grouped, BLOCK_Q=32 if grouped <= 32 else 64,
                 BLOCK_N=64, BLOCK_D=triton_ops.triton.next_power_of_2(dim),
                 BS=16, QUANT=fp8)
    for kernel, extra in ((triton_ops._window_lse_kernel,
                           {"INTERPRET": False}),
                          (triton_ops._window_means_kernel, {})):
        built = _compile_for_hopper(kernel, pointers, {**sizes, **extra})
        assert built.asm["cubin"]


def test_fp8_write_kv_compiles_for_hopper():
    """The GPU's conversion path of the fp8 K/V write (the interpreter
    takes ``_on_e4m3_grid`` instead) builds for sm_90."""
    pytest.importorskip("triton")
    from vllm_sparsemm.kernels import triton_ops
    built = _compile_for_hopper(
        triton_ops._write_kv_kernel,
        {"rows_ptr": "*fp8e4nv", "dst_ptr": "*i64", "tokens_ptr": "*i64",
         "key_ptr": "*bf16", "value_ptr": "*bf16", "limit": "fp32"},
        {"HAS_TOKENS": True, "BLOCK_D": 128, "QUANT": True,
         "INTERPRET": False})
    assert "cvt.rn.satfinite.e4m3x2.f32" in built.asm["ptx"]


class _CountingKernel:
    """A Triton kernel whose own launches (``kernel[grid](...)``) are
    counted; all else passes through."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_per_layer_kernels_launch_past_tritons_path_and_equal_references(
        monkeypatch):
    """Once Triton built a kernel for a key, ``kernels/launch.py`` launches
    it directly: the second pass of the comparisons takes Triton's path
    never, and writes what the references do. A launch hook (a profiler's)
    sends every launch back through Triton's path, which runs the hook."""
    from triton import knobs

    from vllm_sparsemm.kernels import triton_ops
    comparisons = (compare_write_kv, compare_write_kv_fp8,
                   compare_paged_decode, compare_paged_decode_fp8,
                   compare_plan_decode, compare_window_means,
                   compare_window_means_fp8)
    launchers = (triton_ops._launch_write_kv, triton_ops._launch_decode,
                 triton_ops._launch_decode_combine,
                 triton_ops._launch_window_lse,
                 triton_ops._launch_window_means)
    for compare in comparisons:
        compare("cuda")
    direct = [launcher.direct_launches for launcher in launchers]
    for launcher in launchers:
        monkeypatch.setattr(launcher, "kernel",
                            _CountingKernel(launcher.kernel))
    for compare in comparisons:
        compare("cuda")
    assert [launcher.kernel.launches for launcher in launchers] == [0] * 5
    assert all(launcher.direct_launches > before
               for launcher, before in zip(launchers, direct))

    hooked = []
    knobs.runtime.launch_enter_hook.add(hooked.append)
    try:
        compare_write_kv("cuda")
    finally:
        knobs.runtime.launch_enter_hook.remove(hooked.append)
    assert triton_ops._launch_write_kv.kernel.launches == len(hooked) > 0
