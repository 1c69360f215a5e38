"""The Triton page-table kernel against its PyTorch reference, on the compressed
rows of real CPU-engine steps: through Triton's interpreter on the CPU, and on
the GPU for the compiled kernel."""

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


_NUMPY_SCALAR_ERROR = "error::DeprecationWarning:triton.runtime.interpreter"


def test_page_table_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, %r); import test_triton_ops as t; "
            "print('compared', t.compare_on_engine_steps('cpu'))" % str(HERE))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="1",
                                   # NumPy >= 2.4 raises where older ones warn
                                   PYTHONWARNINGS=_NUMPY_SCALAR_ERROR),
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compared = int(done.stdout.split("compared")[-1])
    assert compared > 50


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_page_table_kernel_on_gpu():
    assert compare_on_engine_steps("cuda") > 50
