"""``kernels/launch.py``'s choice between a direct launch and Triton's own
path, on a stand-in kernel with Triton's binder contract. The GPU test in
``test_triton_ops.py`` runs it on the real kernels."""

from types import SimpleNamespace

import pytest
import torch

from vllm_sparsemm.kernels import launch


class _Built:
    """A compiled kernel: records each direct launch."""
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _Kernel:
    """A JIT kernel ``(x, n, BLOCK: constexpr)``: Triton's binder contract,
    and its own launches recorded."""

    def __init__(self):
        self.built, self.triton, self.pre_run_hooks = _Built(), [], []
        self.device_caches = {0: (None, ) * 4 + (self.bind, )}

    @staticmethod
    def bind(x, n, BLOCK, **options):
        specialization = [("*fp16", "D" if x % 16 == 0 else None),
                          ("i32", n == 1), ("constexpr", BLOCK)]
        return {"x": x, "n": n, "BLOCK": BLOCK}, specialization, options

    def __getitem__(self, grid):
        def triton_launch(*args, **kwargs):
            self.triton.append((grid, args, kwargs))
            return self.built
        return triton_launch


@pytest.fixture
def hooks(monkeypatch):
    """Triton's runtime on a GPU, its hook chains empty."""
    runtime = SimpleNamespace(launch_enter_hook=SimpleNamespace(calls=[]),
                              launch_exit_hook=SimpleNamespace(calls=[]))
    monkeypatch.setattr(launch, "_runtime", runtime)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 7)
    return runtime


def _launcher() -> launch.Launcher:
    launcher = launch.Launcher(_Kernel())
    launcher._direct = True
    return launcher


def test_a_key_triton_built_before_launches_directly(hooks):
    launcher = _launcher()
    kernel = launcher.kernel
    launcher((4, ), 32, 5, BLOCK=64, num_warps=2)  # Triton's path builds
    launcher((4, 2), 64, 9, BLOCK=64, num_warps=2)  # the same key
    assert len(kernel.triton) == 1
    assert kernel.built.runs == [(4, 2, 1, 7, "function", "metadata", None,
                                  None, None, 64, 9, 64)]
    assert launcher.direct_launches == 1
    # a new alignment, a 1, a constant, an option: each a key of its own
    for args, kwargs in (((33, 5), dict(BLOCK=64, num_warps=2)),
                         ((32, 1), dict(BLOCK=64, num_warps=2)),
                         ((32, 5), dict(BLOCK=128, num_warps=2)),
                         ((32, 5), dict(BLOCK=64, num_warps=4))):
        launcher((4, ), *args, **kwargs)
    assert len(kernel.triton) == 5 and len(kernel.built.runs) == 1


def test_an_unhashable_constant_always_takes_tritons_path(hooks):
    launcher = _launcher()
    for _ in range(2):
        launcher((1, ), 32, 5, BLOCK=[64])
    assert len(launcher.kernel.triton) == 2 and not launcher.kernel.built.runs


def test_launch_hooks_take_tritons_path(hooks):
    launcher = _launcher()
    launcher((1, ), 32, 5, BLOCK=64)
    hooks.launch_enter_hook.calls.append(print)  # a profiler's
    launcher((1, ), 32, 5, BLOCK=64)
    hooks.launch_enter_hook.calls.clear()
    launcher.kernel.pre_run_hooks.append(print)
    launcher((1, ), 32, 5, BLOCK=64)
    assert len(launcher.kernel.triton) == 3 and not launcher.kernel.built.runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs without a GPU")
def test_without_a_gpu_every_launch_is_tritons():
    launcher = launch.Launcher(_Kernel())
    for _ in range(2):
        launcher((1, ), 32, 5, BLOCK=64)
    assert launcher._direct is False and len(launcher.kernel.triton) == 2


def test_tritons_binder_keys_write_kv_as_triton_does(hooks, monkeypatch):
    """Triton's own binder (built for sm90, no GPU needed) on ``write_kv``'s
    real arguments: the key hashes and repeats for the same call, a K/V view
    off 16-byte alignment is a new key (Triton specializes on it), ``dst``'s
    is not (``do_not_specialize_on_alignment``), and the launch gets every
    value in the kernel's parameter order, constants included."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from vllm_sparsemm.kernels import triton_ops
    launcher = triton_ops._launch_write_kv
    jit = launcher.kernel
    stand_in = _Kernel()
    stand_in.device_caches = {0: (None, ) * 4 + (create_function_from_signature(
        jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32))), )}
    monkeypatch.setattr(launcher, "kernel", stand_in)
    monkeypatch.setattr(launcher, "_direct", True)
    monkeypatch.setattr(launcher, "_built", {})
    heads, dim = 2, 128
    rows = torch.zeros(64, 2 * dim, dtype=torch.float16)
    kv = torch.zeros(2 * 4 * heads * dim + 1, dtype=torch.float16)
    key, value = kv[:4 * heads * dim], kv[4 * heads * dim:-1]
    dst = torch.arange(4 * heads + 1)

    def write(key, value, dst):
        triton_ops.write_kv(rows, dst, key.view(4, heads, dim),
                            value.view(4, heads, dim), None)

    write(key, value, dst[:-1])
    write(key, value, dst[:-1])
    assert len(stand_in.triton) == 1 and len(stand_in.built.runs) == 1
    values = dict(zip(jit.arg_names, stand_in.built.runs[0][9:], strict=True))
    assert values["rows_ptr"] is rows and values["num_heads"] == heads
    assert values["BLOCK_D"] == dim and values["HAS_TOKENS"] is False
    assert stand_in.built.runs[0][:3] == (4 * heads, 1, 1)
    write(key, value, dst[1:])  # dst 8 bytes off: the same key
    assert len(stand_in.triton) == 1 and len(stand_in.built.runs) == 2
    write(kv[1:4 * heads * dim + 1], value, dst[:-1])  # key 2 bytes off
    assert len(stand_in.triton) == 2
