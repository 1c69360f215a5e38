"""The CUDA compaction kernel against its PyTorch reference, bit for bit."""

import pytest
import torch

from vllm_sparsemm import _ext
from vllm_sparsemm.kv_ops import move_rows, move_rows_reference

pytestmark = pytest.mark.gpu


def test_extension_is_built():
    assert _ext.kernels() is not None, (
        "vllm_sparsemm._C missing: pip install --no-build-isolation -e .")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("packed", [True, False])
def test_move_rows_matches_reference(dtype, head_dim, packed):
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    width = 2 * head_dim if packed else head_dim  # K|V packed, or K alone
    base = torch.randn(4096, 2 * head_dim, device="cuda", dtype=dtype,
                       generator=gen)
    rows = base[:, :width]  # a strided view when only K is moved
    perm = torch.randperm(4096, device="cuda", generator=gen)
    src, dst = perm[:3000], torch.randperm(4096, device="cuda",
                                           generator=gen)[:3000]
    want = base.clone()
    move_rows_reference(want[:, :width], src, dst)
    move_rows(rows, src, dst)
    # bit for bit, and the columns outside the view untouched
    assert torch.equal(base.view(torch.int16), want.view(torch.int16))


def test_overlapping_chains_read_before_write():
    rows = torch.arange(64, device="cuda", dtype=torch.float16).view(8, 8)
    rows = rows.repeat(1, 8)  # rows of 64 halves
    want = rows.clone()
    src = torch.tensor([1, 2, 3, 4], device="cuda")
    dst = torch.tensor([0, 1, 2, 3], device="cuda")
    move_rows_reference(want, src, dst)
    move_rows(rows, src, dst)
    assert torch.equal(rows, want)
