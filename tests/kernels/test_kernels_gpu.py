"""The CUDA compaction kernel against its PyTorch reference, bit for bit."""

import pytest
import torch

from vllm_sparsemm.kernels import cuda_ext as _ext
from vllm_sparsemm.kernels.kv_ops import copy_rows, copy_rows_reference

pytestmark = pytest.mark.gpu


def test_extension_is_built():
    assert _ext.kernels() is not None, (
        "vllm_sparsemm._C missing: pip install --no-build-isolation -e .")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("packed", [True, False])
def test_copy_rows_matches_reference(dtype, head_dim, packed):
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    width = 2 * head_dim if packed else head_dim  # K|V packed, or K alone
    base = torch.randn(4096, 2 * head_dim, device="cuda", dtype=dtype,
                       generator=gen)
    rows = base[:, :width]  # a strided view when only K is moved
    # out of place, as compaction copies: no destination is a source
    perm = torch.randperm(4096, device="cuda", generator=gen)
    src, dst = perm[:2000], perm[2000:4000]
    want = base.clone()
    copy_rows_reference(want[:, :width], src, dst)
    copy_rows(rows, src, dst)
    # bit for bit, and the columns outside the view untouched
    assert torch.equal(base.view(torch.int16), want.view(torch.int16))


def test_rows_outside_the_destinations_are_untouched():
    rows = torch.arange(64, device="cuda", dtype=torch.float16).view(8, 8)
    rows = rows.repeat(1, 8)  # rows of 64 halves
    want = rows.clone()
    src = torch.tensor([1, 2, 3, 4], device="cuda")
    dst = torch.tensor([7, 6, 0, 5], device="cuda")
    copy_rows_reference(want, src, dst)
    copy_rows(rows, src, dst)
    assert torch.equal(rows, want)
    assert torch.equal(rows[1:5], torch.arange(8, 40, device="cuda",
                                               dtype=torch.float16)
                       .view(4, 8).repeat(1, 8))
