"""Host cost that does not grow with the batch: the ops the worker dispatches per
step and per layer are the same for few or many requests (each op is a kernel
launch on the GPU, where host time per step is what piecewise graphs expose)."""

import collections

from torch.utils._python_dispatch import TorchDispatchMode

from cpu_engine import LAYERS, Engine
from vllm_sparsemm.engine import backend


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view  # views launch nothing
        return func(*args, **(kwargs or {}))


def _counted(monkeypatch, module, name, counts):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        with CountOps() as ops:
            result = original(*args, **kwargs)
        counts[name].append(ops.count)
        return result

    monkeypatch.setattr(module, name, wrapper)


def _ops_per_call(monkeypatch, num_requests):
    counts = collections.defaultdict(list)
    for name in ("build_step", "write_compressed", "select_layer",
                 "compact"):
        _counted(monkeypatch, backend, name, counts)
    eng = Engine()
    # equal prompt lengths: all complete in one step, then decode together
    plans = eng.add_all({str(r): 90 for r in range(num_requests)}, 500, 3)
    for _ in eng.run(plans):
        pass
    monkeypatch.undo()
    return counts


def test_ops_per_step_and_layer_do_not_grow_with_the_batch(monkeypatch):
    few, many = (_ops_per_call(monkeypatch, n) for n in (2, 6))
    # selection: once per layer in the step that completes the prompts, for
    # all prompts of one length at once
    assert few["select_layer"] == many["select_layer"]
    assert len(few["select_layer"]) == LAYERS
    # compaction: the requests of one plan move together
    assert few["compact"] == many["compact"]
    # decode: the step's index tensors, then a few ops per layer
    assert few["write_compressed"] == many["write_compressed"]
    assert max(few["write_compressed"]) <= 4
    assert few["build_step"][1:] == many["build_step"][1:]


def test_upload_packs_lists_and_arrays_into_int64_views_of_one_buffer():
    import numpy as np
    import torch

    from vllm_sparsemm.engine.host_arrays import upload

    parts = upload([[3, 1], np.arange(6, dtype=np.int32).reshape(2, 3), [],
                    torch.tensor([7], dtype=torch.int32)], "cpu")
    assert [p.shape for p in parts] == [(2,), (2, 3), (0,), (1,)]
    assert all(p.dtype == torch.int64 for p in parts)
    assert [p.tolist() for p in parts] == [[3, 1], [[0, 1, 2], [3, 4, 5]], [],
                                           [7]]
    # one host buffer (one copy to the device), in order
    assert parts[1].data_ptr() == parts[0].data_ptr() + 2 * 8
