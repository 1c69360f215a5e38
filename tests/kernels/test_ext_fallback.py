"""A CUDA extension built for other GPUs falls back to the PyTorch reference (CPU test)."""

import logging
import types

import pytest
import torch

from vllm_sparsemm.kernels import cuda_ext as _ext
from vllm_sparsemm.kernels.kv_ops import copy_rows, copy_rows_reference

NO_IMAGE = ("CUDA error: no kernel image is available for execution on the "
            "device")


class OnGpu(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so copy_rows takes the kernel branch."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def fake_kernels(monkeypatch, caplog):
    """A fake ``_C`` whose copy_rows raises ``error``; counts its calls."""
    module = types.SimpleNamespace(calls=0, error=RuntimeError(NO_IMAGE))

    def fake_copy_rows(rows, src, dst):
        module.calls += 1
        raise module.error

    module.copy_rows = fake_copy_rows
    monkeypatch.setattr(_ext, "kernels", lambda: module)
    monkeypatch.setattr(_ext, "_no_image", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: (12, 0))
    # vLLM's loggers do not propagate to the root logger caplog listens on
    logger = logging.getLogger("vllm.sparsemm.kernels")
    logger.addHandler(caplog.handler)
    yield module
    logger.removeHandler(caplog.handler)


def _case():
    rows = torch.arange(32, dtype=torch.float32).view(8, 4)
    src, dst = torch.tensor([1, 2, 3]), torch.tensor([2, 3, 0])
    want = rows.clone()
    copy_rows_reference(want, src, dst)
    return rows, src, dst, want


@pytest.mark.parametrize("error", [
    NO_IMAGE, "CUDA error: invalid device function"])
def test_no_kernel_image_falls_back_once(fake_kernels, caplog, error):
    fake_kernels.error = RuntimeError(error)
    for _ in range(2):
        rows, src, dst, want = _case()
        copy_rows(rows.as_subclass(OnGpu), src, dst)
        assert torch.equal(rows, want)
    assert fake_kernels.calls == 1  # the decision is remembered
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "compute capability 12.0" in warnings[0].getMessage()
    assert "PyTorch reference" in warnings[0].getMessage()


def test_run_kernel_reports_fallback(fake_kernels):
    rows, src, dst, _ = _case()
    assert _ext.run_kernel("copy_rows", rows.device, rows, src, dst) is False
    assert _ext.run_kernel("copy_rows", rows.device, rows, src, dst) is False
    assert fake_kernels.calls == 1


def test_other_kernel_errors_propagate(fake_kernels, caplog):
    fake_kernels.error = RuntimeError("CUDA error: an illegal memory access "
                                      "was encountered")
    rows, src, dst, _ = _case()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        copy_rows(rows.as_subclass(OnGpu), src, dst)
    assert _ext._no_image is False and not caplog.records


def test_without_extension_the_reference_runs(monkeypatch):
    monkeypatch.setattr(_ext, "kernels", lambda: None)
    rows, src, dst, want = _case()
    copy_rows(rows.as_subclass(OnGpu), src, dst)
    assert torch.equal(rows, want)
