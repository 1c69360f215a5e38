"""The Triton kernels against their PyTorch references: the page table on the
compressed rows of real CPU-engine steps, the K/V write on vLLM-shaped strided
views. Through Triton's interpreter on the CPU, compiled on the GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def compare_on_engine_steps(device: str) -> int:
    """Drive the CPU engine into mixed prefill/decode steps; compare every layer's
    page table from the kernel with the reference. Returns tables compared."""
    sys.path.insert(0, str(HERE))
    from test_backend_cpu import Engine

    from vllm_sparsemm import backend, triton_ops
    from vllm_sparsemm.layer_ops import compressed_page_table, page_table_width

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
    from vllm_sparsemm import triton_ops
    from vllm_sparsemm.kv_ops import write_rows

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


_NUMPY_SCALAR_ERROR = "error::DeprecationWarning:triton.runtime.interpreter"


def _in_triton_interpreter(comparison: str) -> int:
    """Run ``comparison('cpu')`` of this module under Triton's interpreter
    (a fresh process: the flag is read at import) and return its count."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, %r); import test_triton_ops as t; "
            "print('compared', t.%s('cpu'))" % (str(HERE), comparison))
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_page_table_kernel_on_gpu():
    assert compare_on_engine_steps("cuda") > 50


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_write_kv_kernel_on_gpu():
    assert compare_write_kv("cuda") == 4
