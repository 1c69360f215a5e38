"""Admission of compressed requests, on vLLM's own scheduler (CPU).

A compressed request holds its whole prompt's blocks until compaction, then
few, and then grows by one block per ``block_size`` output tokens, a large
share of its footprint. vLLM's admission checks only the new prompt, so
decoding requests that cannot grow get preempted and recompute their whole
prompt. The sparsemm manager's gate reserves the running requests' remaining
prefill and growth; these tests pin its arithmetic and its effect.
"""

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from example_scripts import load_example
from vllm_sparsemm.config import SparseMMSettings
from vllm_sparsemm.page_plan import cdiv
from vllm_sparsemm.plugin import register

BS = 16


def _sim():
    return load_example("scheduler_sim")


def _scores(layers=4, heads=4):
    return torch.rand(layers, heads, generator=torch.Generator().manual_seed(0))


def _manager(reserve, num_blocks=400):
    register()
    spec = _sim().sparsemm_spec(64, reserve, _scores(), head_size=8)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(
                               [f"model.layers.{i}.self_attn.attn"
                                for i in range(4)], spec)])
    kv = KVCacheManager(config, max_model_len=4096, scheduler_block_size=BS,
                        hash_block_size=BS, enable_caching=False)
    return kv, kv.coordinator.single_type_managers[0]


def _request(rid, prompt_len, max_tokens):
    return Request(rid, [1] * prompt_len,
                   SamplingParams(max_tokens=max_tokens), None)


def test_reserve_counts_unfinished_prefill_and_growth_to_the_horizon():
    kv, manager = _manager(reserve=64)
    law = manager.law
    # a: prefilling, 96 of 300 prompt tokens allocated
    a = _request("a", 300, 500)
    assert kv.allocate_slots(a, 96) is not None
    a.num_computed_tokens = 96
    # b: its 200-token prompt done (compacted), one token after it allocated
    b = _request("b", 200, 30)
    assert kv.allocate_slots(b, 200) is not None
    b.num_computed_tokens = 200
    assert kv.allocate_slots(b, 1) is not None  # compaction is noticed here
    held_b = manager._held_blocks("b")
    assert held_b == law.compacted_blocks(200, 1) < cdiv(200, BS)
    manager.note_request("new", 300, 1300)
    reserve = manager.admission_reserve("new", 300)
    own = law.compacted_blocks(300, 64) - cdiv(300, BS)  # never above the prompt
    owed_a = cdiv(300, BS) - cdiv(96, BS)  # then it shrinks: prompt is the peak
    # b grows to its limit (200 + 30 tokens), inside the 64-token horizon
    grow_b = law.compacted_blocks(200, 30) - held_b
    assert reserve == max(own, 0) + owed_a + grow_b
    assert owed_a > 0 and grow_b > 0
    # 0 turns the gate off: vLLM's optimistic admission
    kv0, manager0 = _manager(reserve=0)
    assert manager0.admission_reserve("new", 300) == 0


def test_gate_refuses_admission_that_would_starve_running_growth():
    kv, manager = _manager(reserve=-1, num_blocks=40)
    first = _request("first", 300, 400)  # 19 prompt blocks, grows after
    assert kv.allocate_slots(first, 300, full_sequence_must_fit=True)
    first.num_computed_tokens = 300
    first.append_output_token_ids([0])
    assert kv.allocate_slots(first, 1)  # compacted: few blocks now
    free = kv.block_pool.get_num_free_blocks()
    second = _request("second", 300, 400)
    assert free >= cdiv(300, BS)  # the prompt alone would fit...
    need = cdiv(300, BS) + manager.admission_reserve("second", 300)
    assert need > free  # ...but not with first's growth to 700 tokens
    assert kv.allocate_slots(second, 300, full_sequence_must_fit=True) is None


def test_gate_never_holds_back_a_request_when_nothing_runs():
    kv, manager = _manager(reserve=-1, num_blocks=22)
    alone = _request("alone", 300, 3000)  # growth alone would need the pool
    assert kv.allocate_slots(alone, 300, full_sequence_must_fit=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _sim().write_text_model(tmp_path_factory.mktemp("model"), 4, 4)


@pytest.mark.parametrize("reserve", [0, SparseMMSettings().admission_reserve])
def test_saturated_burst_on_vllms_scheduler(model_dir, reserve):
    """A burst larger than the pool: with the reserve (the default) no request
    is ever preempted and all finish; without it vLLM preempts decoding
    requests and recomputes their prompts."""
    sim = _sim()
    spec = sim.sparsemm_spec(64, reserve, _scores(), head_size=8)
    scheduler = sim.make_scheduler(spec, num_blocks=120,
                                   max_batched_tokens=1024, max_num_seqs=64,
                                   model_dir=model_dir)
    result = sim.simulate(scheduler, num_requests=40, prompt_len=400,
                          output_len=160)
    assert result["finished"]
    if reserve:
        assert result["preemptions"] == 0
    else:
        assert result["preemptions"] > 0 and result["recomputed_tokens"] > 0


def test_sim_without_prefill_transient_holds_only_compacted_blocks(model_dir):
    """The what-if mode of examples/scheduler_sim.py: prompts are never
    chunked and no request ever holds more than its compacted blocks, while
    the real manager holds the whole prompt during prefill."""
    sim = _sim()
    peaks = {}
    for transient in (True, False):
        spec = sim.sparsemm_spec(64, 64, _scores(), head_size=8)
        scheduler = sim.make_scheduler(spec, num_blocks=120,
                                       max_batched_tokens=1024,
                                       max_num_seqs=64, model_dir=model_dir,
                                       max_model_len=1024,
                                       chunked_prefill=transient)
        if not transient:
            sim.without_prefill_transient(scheduler)
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        law, peak = manager.law, [0]
        schedule = scheduler.schedule

        def checked_schedule():
            out = schedule()
            for rid, n in out.num_scheduled_tokens.items():
                request = scheduler.requests[rid]
                held = manager._held_blocks(rid)
                peak[0] = max(peak[0], held)
                if not transient:
                    assert request.num_computed_tokens > 0 or n >= 400
                    assert held <= law.compacted_blocks(
                        400, max(request.num_computed_tokens + n - 400, 0))
            return out

        scheduler.schedule = checked_schedule
        result = sim.simulate(scheduler, num_requests=12, prompt_len=400,
                              output_len=40)
        assert result["finished"]
        peaks[transient] = peak[0]
    assert peaks[True] >= cdiv(400, BS) > peaks[False]


def test_a_preempted_request_compacts_and_releases_again():
    """Per-request facts the manager keeps (released range, entries freed)
    are dropped with the request: after recompute preemption the re-prefill
    holds its whole prompt, then compacts and gives the blocks back again."""
    kv, manager = _manager(reserve=64)
    law = manager.law
    for attempt in range(2):
        a = _request("a", 300, 100)
        a.num_computed_tokens = 0
        tail = 20 * attempt  # the re-prefill recomputes outputs too
        assert kv.allocate_slots(a, 300 + tail) is not None
        assert manager._held_blocks("a") == cdiv(300 + tail, BS)
        a.num_computed_tokens = 300 + tail
        assert kv.allocate_slots(a, 1) is not None  # compaction noticed here
        free_after = kv.block_pool.get_num_free_blocks()
        expected = law.compacted_blocks(300, tail + 1)
        assert manager._held_blocks("a") == expected < cdiv(300, BS)
        assert free_after == 400 - 1 - expected  # block 0 is vLLM's null block
        kv.free(a)
        assert kv.block_pool.get_num_free_blocks() == 399


def test_sim_charges_each_prompt_once_per_start(model_dir):
    """The fitted cost model's per-prompt term (the vision tower): charged
    when a prompt's first chunk runs, so once per request plus once per
    recompute after a preemption, never per chunk."""
    sim = _sim()
    spec = sim.sparsemm_spec(64, 0, _scores(), head_size=8)
    scheduler = sim.make_scheduler(spec, num_blocks=120,
                                   max_batched_tokens=256, max_num_seqs=64,
                                   model_dir=model_dir)
    only_prompts = sim.CostModel(weights_s=0.0, token_s=0.0,
                                 kv_bytes_per_s=float("inf"), prompt_s=1.0)
    result = sim.simulate(scheduler, num_requests=40, prompt_len=400,
                          output_len=160, cost=only_prompts)
    assert result["finished"] and result["preemptions"] > 0  # chunks, too
    assert result["seconds"] == 40 + result["preemptions"]
