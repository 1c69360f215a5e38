"""The worker's torch thread limit: one thread for a CUDA worker unless the
user set OMP_NUM_THREADS; a CPU worker keeps its threads."""

import pytest
import torch

from vllm_sparsemm.engine.host_threads import limit_host_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
def test_cuda_worker_gets_one_thread(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    limit_host_threads(torch.device("cuda", 0))
    assert torch.get_num_threads() == 1


@pytest.mark.usefixtures("two_threads")
def test_user_thread_count_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    limit_host_threads(torch.device("cuda", 0))
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_cpu_worker_keeps_its_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit_host_threads(torch.device("cpu"))
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_an_engine_in_the_users_process_keeps_its_threads(monkeypatch):
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine in the caller's
    process: a process-wide thread count there would be the user's."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    limit_host_threads(torch.device("cuda", 0))
    assert torch.get_num_threads() == 2
