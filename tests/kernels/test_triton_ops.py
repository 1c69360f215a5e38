"""The Triton kernels against their PyTorch references: the page table on the
compressed rows of real CPU-engine steps, the K/V write on vLLM-shaped strided
views. Through Triton's interpreter on the CPU, compiled on the GPU."""

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


def compare_plan_decode(device: str) -> int:
    """``triton_ops.paged_decode`` reading the pages straight from the step
    plan (no table) against the CPU backend's own attention output, in the
    decode steps of the CPU engine (compacted heads, growing pages, several
    requests), after each layer wrote its new K/V, on both the per-step and
    the full-graph fixed path. Returns the (step, layer, split) cases."""
    sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
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
        for splits in (1, 3):
            out = torch.full_like(query[cr.tokens], float("nan")).to(device)
            triton_ops.paged_decode(
                query[cr.tokens].to(device), pages, None, moved.lengths[index],
                self.scale, out, num_splits=splits, plan=(moved, index, state))
            # float32 pages and products in both
            torch.testing.assert_close(out.cpu()[rows], output[cr.tokens][rows],
                                       atol=1e-4, rtol=1e-4)
            compared += 1

    backend.SparseMMImpl._compressed_attention = checking_attention
    try:
        eng = Engine(num_blocks=300)
        plans = eng.add_all({"a": 300, "b": 180, "c": 30, "d": 97}, 64, 20)
        for _ in eng.run(plans):
            pass
        # graph_decode's fixed path: the uncompressed "b" on the identity
        # plan, rows padded to 5 and 8, page tables as wide as max_model_len
        eng, budget, every = Engine(full_graphs=True), compared + 18, 1
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
    return compared


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


def test_page_table_kernel_in_triton_interpreter():
    assert _in_triton_interpreter("compare_on_engine_steps") > 50


def test_write_kv_kernel_in_triton_interpreter():
    assert _in_triton_interpreter("compare_write_kv") == 4


def test_paged_decode_kernel_in_triton_interpreter():
    assert _in_triton_interpreter("compare_paged_decode") == 9


def test_paged_decode_from_the_plan_in_triton_interpreter():
    assert _in_triton_interpreter("compare_plan_decode") == 48


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_paged_decode_kernel_on_gpu():
    assert compare_paged_decode("cuda") == 12


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_write_kv_kernel_on_gpu():
    assert compare_write_kv("cuda") == 4


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


@pytest.mark.parametrize("dim, group, split, from_plan", [
    (128, 1, False, False), (128, 1, True, False), (128, 1, False, True),
    (80, 7, False, True), (64, 4, True, False)])
def test_paged_decode_compiles_for_sm90_without_spills(dim, group, split,
                                                      from_plan, tmp_path):
    """The GPU branch of the decode kernel (the for loop, which the
    interpreter cannot run) compiled ahead of time for an H100/H200 with
    Triton's own ptxas: it must build, keep its registers (a spill to local
    memory would cost the kernel its bandwidth) and stream K and V in with
    pipelined 16-byte asynchronous copies."""
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
            "*fp16" if name in ("q_ptr", "pages_ptr", "out_ptr") else
            "*fp32" if name == "part_ptr" else
            ("*i64" if from_plan else "*i32") if name in plan_ptrs else
            "*i32" if name.endswith("_ptr") else
            "fp32" if name == "scale" else "i32")
    # the backend's launch configuration (paged_decode's defaults)
    defaults = inspect.signature(triton_ops.paged_decode).parameters
    warps = defaults["num_warps"].default
    constants = {"G_PAD": max(16, triton.next_power_of_2(group)),
                 "BLOCK_D": triton.next_power_of_2(dim), "BS": 16,
                 "SPLIT": split, "FROM_PLAN": from_plan, "INTERPRET": False,
                 "NUM_STAGES": defaults["num_stages"].default}
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


def compare_window_means(device: str) -> int:
    """``triton_ops.window_means`` against ``selection.window_means`` over
    keys gathered from the same packed cache: MHA and GQA (up to 72 grouped
    window rows: two query blocks), head dims 64 and 80, prompts of several
    lengths (one exactly W + 1), a pass of two layers, fp16 (fp32 on the CPU, where the interpreter computes). The
    kernel sums in another order, so values agree to float32 rounding, not
    bit for bit. Returns cases compared."""
    from vllm_sparsemm.core.pages import PageSpace, standard_row
    from vllm_sparsemm.core.selection import window_means
    from vllm_sparsemm.kernels import triton_ops

    compared = 0
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    block_size, num_layers, num_blocks, window = 16, 3, 40, 8
    for kv_heads, group, dim, lengths in ((2, 1, 64, [40, 9, 33]),
                                          (2, 4, 80, [70, 25]),
                                          (1, 9, 64, [30, 90])):  # GW > 64
        space = PageSpace(num_layers, num_blocks, kv_heads, block_size)
        rows = torch.randn(num_blocks * num_layers * kv_heads * block_size,
                           2 * dim, generator=gen).to(dtype).to(device)
        longest = max(lengths)
        columns = -(-longest // block_size)
        blocks = torch.randperm(num_blocks, generator=gen)[
            :len(lengths) * columns].view(len(lengths), columns)
        blocks = blocks.to(torch.int32).to(device)
        lens = torch.tensor(lengths, device=device)
        first, layers = 1, 2
        queries = torch.randn(layers * len(lengths), window, kv_heads * group,
                              dim, generator=gen).to(dtype).to(device)
        got = triton_ops.window_means(queries, rows, blocks, lens, first,
                                      num_layers, kv_heads, block_size,
                                      longest)
        positions = torch.arange(longest, device=device).clamp(
            max=lens[:, None] - 1)  # [b, N]: padded with each last position
        heads = torch.arange(kv_heads, device=device)
        for at, layer in enumerate(range(first, first + layers)):
            block = blocks.long().gather(1, positions // block_size)[..., None]
            keys = rows[standard_row(space, block, layer, heads,
                                     positions[..., None]), :dim]
            part = slice(at * len(lengths), (at + 1) * len(lengths))
            want = window_means(queries[part].float(), keys.float(), lens)
            torch.testing.assert_close(got[part], want, rtol=1e-4, atol=1e-6)
            compared += 1
    return compared


def test_window_means_kernel_in_triton_interpreter():
    assert _in_triton_interpreter("compare_window_means") == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_window_means_kernel_on_gpu():
    assert compare_window_means("cuda") == 6


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
    source = ASTSource(fn=kernel, signature=signature, constexprs={
        (names.index(name), ): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


@pytest.mark.parametrize("group, dim", [(1, 128), (7, 80)])
def test_window_kernels_compile_for_hopper(group, dim):
    pytest.importorskip("triton")
    from vllm_sparsemm.kernels import triton_ops
    pointers = {"q_ptr": "*fp16", "rows_ptr": "*fp16", "blocks_ptr": "*i32",
                "lengths_ptr": "*i64", "lse_ptr": "*fp32", "out_ptr": "*fp32"}
    grouped = group * 32
    sizes = dict(WINDOW=32, GW=grouped, BLOCK_Q=32 if grouped <= 32 else 64,
                 BLOCK_N=64, BLOCK_D=triton_ops.triton.next_power_of_2(dim),
                 BS=16)
    for kernel, extra in ((triton_ops._window_lse_kernel,
                           {"INTERPRET": False}),
                          (triton_ops._window_means_kernel, {})):
        built = _compile_for_hopper(kernel, pointers, {**sizes, **extra})
        assert built.asm["cubin"]
