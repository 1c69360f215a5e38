"""Admission of compressed requests, on vLLM's own scheduler (CPU).

A compressed request holds its whole prompt's blocks until compaction, then
few, and then grows by one block per ``block_size`` output tokens, a large
share of its footprint. vLLM's admission checks only the new prompt, so
decoding requests that cannot grow get preempted and recompute their whole
prompt. The sparsemm manager's gate reserves the running requests' remaining
prefill and growth; these tests pin its arithmetic and its effect.
"""

import numpy as np
import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request, RequestStatus

from scripts import load_script
from vllm_sparsemm.core.admission import AdmissionPacer, FutureRow, future_peak
from vllm_sparsemm.engine.config import SparseMMSettings
from vllm_sparsemm.core.pages import cdiv
from vllm_sparsemm.engine.plugin import register

BS = 16


def _sim():
    return load_script("scheduler_sim")


def _scores(layers=4, heads=4):
    return torch.rand(layers, heads, generator=torch.Generator().manual_seed(0))


def _manager(reserve, num_blocks=400, pacing=False, caching=False):
    register()
    spec = _sim().sparsemm_spec(64, reserve, _scores(), head_size=8,
                                admission_pacing=pacing)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(
                               [f"model.layers.{i}.self_attn.attn"
                                for i in range(4)], spec)])
    kv = KVCacheManager(config, max_model_len=4096, scheduler_block_size=BS,
                        hash_block_size=BS, enable_caching=caching)
    return kv, kv.coordinator.single_type_managers[0]


def _request(rid, prompt_len, max_tokens, tokens=None):
    # with tokens: hashed blocks, so prefix-cache hits
    hasher = None if tokens is None else _sim().block_hasher(BS)
    return Request(rid, list(tokens) if tokens is not None else
                   [1] * prompt_len, SamplingParams(max_tokens=max_tokens),
                   None, block_hasher=hasher)


def _blocks_at(book, prompt, tokens, limit, prefill_steps, whole, held,
               release, budget, t):
    """One request's blocks ``t`` steps ahead, stepped by hand (the rule
    ``admission.future_peak`` states, evaluated at every step)."""
    after_prompt = max(tokens, prompt) - prompt + t - prefill_steps
    if prompt + max(after_prompt, 0) >= limit:
        return 0  # finished: its last slot is one token before the limit
    law = book.law(budget) if budget else None
    if law is not None and law.compresses(prompt):
        blocks = law.compacted_blocks(prompt, max(after_prompt, 0))
    else:
        blocks = cdiv(prompt + max(after_prompt, 0), BS)
    if whole:  # the prompt alone while prefilling, with the compacted after
        blocks = (0 if t < prefill_steps else blocks) + (
            whole if t < release else 0)
    return max(blocks, held) if t == 0 else blocks


@pytest.mark.parametrize("horizon", [-1, 0, 7, 40])
@pytest.mark.parametrize("cells", [None, 64])
def test_future_peak_equals_the_step_by_step_maximum(horizon, cells,
                                                      monkeypatch):
    """Random mixes of compacted, compacting, prefilling, uncompressed and
    nearly finished requests, of the server's budget, their own or none:
    the event-point maximum equals the maximum over every step (until all
    finish, or up to the horizon). Steady requests are counted per (budget,
    prompt length, phase) when many share a pair, else one by one: both
    ways run, in one chunk or (``cells``) in many."""
    from vllm_sparsemm.core import admission
    if cells:
        monkeypatch.setattr(admission, "_CELLS", cells)
    calls = {"steady": 0, "each": 0}  # of the two functions
    each, steady = admission._each_request, admission._steady_blocks

    def counted_each(*args):
        calls["each"] += 1
        return each(*args)

    def counted_steady(book, pairs, *args):
        calls["steady"] += 1
        return steady(book, pairs, *args)

    monkeypatch.setattr(admission, "_each_request", counted_each)
    monkeypatch.setattr(admission, "_steady_blocks", counted_steady)
    kv, manager = _manager(reserve=64)
    book = manager.book
    rng = np.random.default_rng(0)
    # mostly small mixes; a few large ones put many requests in each phase,
    # and the last ones bring a prompt length of their own to most requests
    sizes = [int(n) for n in rng.integers(1, 20, 40)] + [600] * 2 + [60] * 3
    for k, size in enumerate(sizes):
        lengths = ([40, 300, 517] if k < len(sizes) - 3 else
                   list(range(300, 400)))
        rows = []
        for _ in range(size):
            prompt = int(rng.choice(lengths))  # 40 <= B: uncompressed
            budget = int(rng.choice([64, 64, 120, 0]))  # 0: off
            law = book.law(budget) if budget else None
            limit = prompt + int(rng.integers(1, 90))
            whole = (cdiv(prompt, BS) if law is not None
                     and law.compresses(prompt) else 0)
            kind = rng.random()
            if kind < 0.4:  # compacted, its prompt given back, decoding
                tokens = int(rng.integers(prompt, limit))
                steps, whole, release = 0, 0, 0
            elif kind < 0.6:  # compaction scheduled, its prompt not back yet
                tokens = int(rng.integers(prompt, min(prompt + 3, limit)))
                steps, release = 0, int(rng.integers(1, 3))
            else:  # prefilling in chunks
                chunk = int(rng.integers(16, 400))
                tokens = min(prompt, chunk)
                steps = cdiv(prompt - tokens, chunk)
                release = steps + int(rng.integers(1, 3))
            held = int(rng.integers(0, 40))  # may exceed the rule's count
            rows.append(FutureRow(prompt, tokens, limit, steps, whole, held,
                                  release, budget))
        last = 200 if horizon < 0 else horizon
        expected = max(sum(_blocks_at(book, *row, t) for row in rows)
                       for t in range(last + 1))
        assert future_peak(rows, book, horizon) == expected
    assert calls["steady"] > calls["each"] > 0  # both ways ran


def test_gate_counts_every_request_to_its_limit():
    """The reserve is what the future peak needs beyond the blocks held now
    and the candidate's prompt: here the candidate's own growth and b's,
    while a (prefilling) holds its whole prompt until its transient ends."""
    # a pool these requests could fill at their limits (else the gate
    # stands aside: see the test below)
    kv, manager = _manager(reserve=-1, num_blocks=120)
    law = manager.law
    a = _request("a", 300, 500)  # prefilling, 96 of 300 prompt tokens
    assert kv.allocate_slots(a, 96) is not None
    a.num_computed_tokens = 96
    b = _request("b", 200, 30)  # compacted, one token after its prompt
    assert kv.allocate_slots(b, 200) is not None  # with its compacted blocks
    assert manager._held_blocks("b") == cdiv(200, BS) + law.compacted_blocks(
        200, 0)
    b.num_computed_tokens = 200
    assert kv.allocate_slots(b, 1) is not None  # the prompt goes back here
    held_b = manager._held_blocks("b")
    assert held_b == law.compacted_blocks(200, 1) < cdiv(200, BS)
    manager.note_request("new", 300, 1300)
    rows = manager._future_rows("new", manager._requests["new"], 300)
    # sync scheduling: a prompt goes back one step after its compaction step
    assert rows == [
        (300, 96, 800, cdiv(300 - 96, 96), cdiv(300, BS), cdiv(96, BS),
         cdiv(300 - 96, 96) + 1, 64),
        (200, 201, 230, 0, 0, held_b, 0, 64),
        (300, 300, 1300, 0, cdiv(300, BS), 0, 1, 64)]
    reserve = manager.admission_reserve("new", 300)
    held = cdiv(96, BS) + held_b
    assert reserve == future_peak(rows, manager.book, -1) - held - cdiv(
        300, BS) > 0
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
    manager.note_request("second", 300, 700)  # as patches.py does first
    assert free >= cdiv(300, BS)  # the prompt alone would fit...
    need = cdiv(300, BS) + manager.admission_reserve("second", 300)
    assert need > free  # ...but not with both growing to 700 tokens
    assert kv.allocate_slots(second, 300, full_sequence_must_fit=True) is None


@pytest.mark.parametrize("num_blocks", [4000, 400])
def test_gate_and_pacer_stand_aside_while_all_fit(num_blocks):
    """A burst of 24 requests on a roomy pool (all of them at their limits
    fit): all start at once, no pacing, no reserve, so an idle server adds
    no wait to time-to-first-token. On a pool they could fill, the pacer
    starts a few, then one per interval."""
    kv, manager = _manager(reserve=256, num_blocks=num_blocks, pacing=True)
    admitted = 0
    for i in range(24):
        request = _request(f"r{i}", 300, 200)
        manager.note_request(request.request_id, 300, 500)
        if kv.allocate_slots(request, 300, full_sequence_must_fit=True):
            admitted += 1
    if num_blocks == 4000:
        assert admitted == 24
    else:  # the first while all fit, then the pacer's burst
        assert 1 < admitted < 24


def test_shared_prompt_blocks_count_once_when_standing_aside():
    """Chat requests about one image share its prompt blocks (prefix
    caching): what they may hold together is the shared prompt once, plus
    each one's compacted and decode blocks. A burst that fits so, twice
    over, starts at once, as on stock vLLM, though each request's own prompt
    and growth would overfill the pool."""
    prompt, max_tokens, n = 600, 100, 24
    kv, manager = _manager(reserve=256, num_blocks=4000)
    law, window = manager.law, manager.window
    hit = (prompt - window) // BS * BS  # a hit leaves the window to compute
    new = cdiv(prompt, BS) - hit // BS  # blocks each later request adds
    final = law.compacted_blocks(prompt, max_tokens)
    # in use, what the others may still allocate, and the last one's most
    fits = (cdiv(prompt, BS) + (n - 2) * new + (n - 1) * final
            + final + cdiv(prompt, BS))
    num_blocks = 2 * fits + 1  # and the null block
    assert n * (cdiv(prompt, BS) + final) > num_blocks
    kv, manager = _manager(reserve=256, num_blocks=num_blocks, pacing=True,
                           caching=True)
    shared = list(range(10_000, 10_000 + prompt - 8))
    admitted = 0
    for i in range(n):  # one image, then a question of its own
        request = _request(f"r{i}", prompt, max_tokens, shared + [i] * 8)
        hits, num_hit = kv.get_computed_blocks(request)[:2]
        assert num_hit == (0 if i == 0 else hit)
        if kv.allocate_slots(request, prompt - num_hit, num_hit, hits,
                             full_sequence_must_fit=True):
            admitted += 1
    assert admitted == n
    # each holds its compacted blocks beside the prompt in this step
    in_use = num_blocks - 1 - kv.block_pool.get_num_free_blocks()
    assert in_use == cdiv(prompt, BS) + n * law.compacted_blocks(
        prompt, 0) + (n - 1) * new


def test_held_back_requests_are_counted_by_reason(tmp_path, monkeypatch):
    """``vllm:sparsemm_admission_waits_total{reason}``: operators see when
    sparsemm's admission, not the pool, keeps requests waiting."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_sparsemm.engine import metrics
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    monkeypatch.setattr(metrics, "_writer", None)
    writer = metrics.setup("tiny")

    def waits():
        out = {}
        text = generate_latest(writer.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vllm:sparsemm_admission_waits_total":
                    out[sample.labels["reason"]] = sample.value
        return out

    kv, manager = _manager(reserve=-1, num_blocks=40)  # the gate's case
    first = _request("first", 300, 400)
    assert kv.allocate_slots(first, 300, full_sequence_must_fit=True)
    first.num_computed_tokens = 300
    first.append_output_token_ids([0])
    assert kv.allocate_slots(first, 1)
    second = _request("second", 300, 400)
    manager.note_request("second", 300, 700)
    assert kv.allocate_slots(second, 300, full_sequence_must_fit=True) is None
    assert waits() == {"gate": 1}
    kv, manager = _manager(reserve=256, num_blocks=400, pacing=True)
    for i in range(24):  # the pacer's case: a burst on a pool they fill
        request = _request(f"r{i}", 300, 200)
        manager.note_request(request.request_id, 300, 500)
        kv.allocate_slots(request, 300, full_sequence_must_fit=True)
    assert waits()["pacer"] >= 1 and waits()["gate"] == 1
    monkeypatch.setattr(metrics, "_writer", None)


def test_gate_never_holds_back_a_request_when_nothing_runs():
    kv, manager = _manager(reserve=-1, num_blocks=30)
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


def test_the_simulator_counts_a_cut_loads_tokens(model_dir):
    """``first_seconds`` tallies the tokens of the steps that end in that
    modelled time, as a load cut by ``serve_matrix.py --max-seconds`` is
    counted: all of them over the whole run, part of them over half."""
    sim = _sim()
    spec = sim.sparsemm_spec(64, SparseMMSettings().admission_reserve,
                             _scores(), head_size=8)

    def run(first_seconds):
        scheduler = sim.make_scheduler(spec, num_blocks=120,
                                       max_batched_tokens=1024,
                                       max_num_seqs=64, model_dir=model_dir)
        return sim.simulate(scheduler, num_requests=40, prompt_len=400,
                            output_len=160, first_seconds=first_seconds)

    whole = run(None)
    assert whole["first_seconds_tokens"] == (0, 0)
    assert run(whole["seconds"])["first_seconds_tokens"] == (40 * 400,
                                                              40 * 160)
    prompt, output = run(whole["seconds"] / 2)["first_seconds_tokens"]
    assert 0 < prompt < 40 * 400 and 0 < output < 40 * 160


@pytest.mark.parametrize("async_scheduling, num_blocks",
                         [(False, 1800), (True, 1800), (True, 1000)])
def test_a_chat_load_over_shared_images_waits_as_on_stock(
        model_dir, monkeypatch, async_scheduling, num_blocks):
    """64 clients asking questions about 8 images, prefix caching on, on a
    pool their shared prompts fit twice over (1,800 blocks), or once with
    every waiting request at its final size (1,000), though each one's own
    prompt and growth would not: sparsemm's admission holds nobody back,
    and vLLM's scheduler runs the load in stock's steps."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_sparsemm.engine import kv_spec
    sim = _sim()
    waits = []
    monkeypatch.setattr(kv_spec, "_count_wait", waits.append)
    load = dict(num_requests=192, images=8, image_len=300,
                question_len=(20, 40), output_len=64)
    spec = sim.sparsemm_spec(64, 256, _scores(), head_size=8,
                             async_scheduling=async_scheduling)
    law = spec.law()
    own = cdiv(340, BS) + law.compacted_blocks(340, 64)
    assert 64 * own > num_blocks  # each request's own would not fit
    results = {}
    for name, kind in (("stock", FullAttentionSpec(
            block_size=BS, num_kv_heads=4, head_size=8,
            dtype=torch.float16)), ("sparsemm", spec)):
        scheduler = sim.make_scheduler(
            kind, num_blocks=num_blocks, max_batched_tokens=2048,
            max_num_seqs=256, model_dir=model_dir, prefix_caching=True,
            async_scheduling=async_scheduling)
        results[name] = sim.simulate(
            scheduler, 0, 0, 0, requests=sim.chat_requests(**load),
            clients=64)
        assert results[name]["finished"]
        assert results[name]["preemptions"] == 0
    assert waits == []
    assert results["sparsemm"]["steps"] == results["stock"]["steps"]
    assert results["sparsemm"]["mean_waiting"] == pytest.approx(
        results["stock"]["mean_waiting"])


def test_gate_rows_kept_within_a_step_equal_rows_built_afresh(model_dir):
    """The gate keeps the running requests' rows from the first admission of
    a step and rebuilds only those whose state changed since. On vLLM's
    scheduler, through chunked prompts, compactions, several admissions per
    step and preemptions (pacing off, so that a burst collides), they equal
    rows built afresh at every admission."""
    sim = _sim()
    spec = sim.sparsemm_spec(64, 256, _scores(), head_size=8,
                             admission_pacing=False)
    scheduler = sim.make_scheduler(spec, num_blocks=400,
                                   max_batched_tokens=2048, max_num_seqs=64,
                                   model_dir=model_dir)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    # every admission past the pool-wide shortcuts asks the gate
    manager._blocks_within_horizon = lambda tracked: None
    built = manager._future_rows
    calls = {"fresh": 0, "kept": 0}

    def checked(request_id, candidate, num_tokens):
        calls["kept" if manager._step_rows is not None else "fresh"] += 1
        rows = built(request_id, candidate, num_tokens)
        afresh = [manager._running_row(rid, tracked)
                  for rid, tracked in manager._requests.items()
                  if rid != request_id and rid in manager.req_to_blocks]
        assert sorted(rows[:-1]) == sorted(afresh)
        return rows

    manager._future_rows = checked
    result = sim.simulate(scheduler, num_requests=60, prompt_len=400,
                          output_len=320)
    assert result["finished"]
    assert calls["kept"] > 20 and calls["fresh"] > 20
    assert result["preemptions"] > 0


@pytest.mark.parametrize("load, num_blocks", [("chat", 700), ("burst", 700),
                                              ("chat", 3000)])
def test_the_horizon_shortcut_admits_exactly_as_the_gate(
        model_dir, load, num_blocks, monkeypatch):
    """Where every request may still grow far (chat clients that leave
    max_tokens unset: up to max_model_len), the gate's look ahead ran at
    every admission, though it looks only ``admission_reserve`` steps
    ahead. What the running requests may allocate within those steps bounds
    it: where that fits, the gate is not asked. On vLLM's scheduler every
    admission decision equals the gate's, on pools that bind (700 blocks)
    and on one that holds the chat load (3,000), where the gate is then
    hardly asked."""
    from vllm_sparsemm.engine import kv_spec
    sim = _sim()
    peaks = []
    monkeypatch.setattr(kv_spec, "future_peak", lambda *args: peaks.append(
        0) or future_peak(*args))

    def run(shortcut: bool):
        spec = sim.sparsemm_spec(64, 64, _scores(), head_size=8,
                                 admission_pacing=False,
                                 async_scheduling=True)
        scheduler = sim.make_scheduler(
            spec, num_blocks=num_blocks, max_batched_tokens=2048,
            max_num_seqs=256,
            model_dir=model_dir, prefix_caching=load == "chat",
            async_scheduling=True)
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[
            0]
        asked = manager.get_num_blocks_to_allocate
        decisions, looked = [], []  # the gate's look aheads that counted

        def both(request_id, num_tokens, *args, apply_admission_cap=False):
            before = len(peaks)
            blocks = asked(request_id, num_tokens, *args,
                           apply_admission_cap=apply_admission_cap)
            looked.extend(peaks[before:])
            if apply_admission_cap:
                horizon = manager._blocks_within_horizon
                manager._blocks_within_horizon = lambda tracked: None
                gate = asked(request_id, num_tokens, *args,
                             apply_admission_cap=True)
                manager._blocks_within_horizon = horizon
                free = manager.block_pool.get_num_free_blocks()
                decisions.append((blocks <= free, gate <= free))
            return blocks

        manager.get_num_blocks_to_allocate = both
        if not shortcut:
            manager._blocks_within_horizon = lambda tracked: None
        requests = (sim.chat_requests(192, 8, 300, (20, 40), 0,
                                      stop_at=(40, 200))
                    if load == "chat" else None)
        result = sim.simulate(scheduler, 60, 400, 320, requests=requests,
                              clients=64 if load == "chat" else None)
        assert result["finished"]
        return result, decisions, len(looked)

    result, decisions, asked_with = run(shortcut=True)
    assert len(decisions) > 50
    assert all(quick == gate for quick, gate in decisions)
    unbound, _, asked_without = run(shortcut=False)
    assert result["steps"] == unbound["steps"]
    assert asked_with < asked_without
    if num_blocks == 3000:
        assert asked_with < asked_without / 10


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_what_running_requests_may_still_allocate_needs_no_recount(
        model_dir, async_scheduling):
    """The gate's sums of what running requests may still allocate are kept
    up as blocks come and go, and a decode step that adds no block skips
    the recount. Through chunked prompts, compactions, releases, preemptions
    and finishes on vLLM's scheduler, recounting every request before each
    step changes neither sum."""
    sim = _sim()
    spec = sim.sparsemm_spec(64, 256, _scores(), head_size=8,
                             admission_pacing=False,
                             async_scheduling=async_scheduling)
    scheduler = sim.make_scheduler(spec, num_blocks=400,
                                   max_batched_tokens=2048, max_num_seqs=64,
                                   model_dir=model_dir)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    schedule, steps = scheduler.schedule, [0]

    def checked(*args, **kwargs):
        sums = manager._pending_sum, manager._growth_sum
        for rid, tracked in manager._requests.items():
            if rid in manager.req_to_blocks:
                manager._count_what_remains(rid, tracked)
        assert (manager._pending_sum, manager._growth_sum) == sums
        steps[0] += sums[1] > 0
        return schedule(*args, **kwargs)

    scheduler.schedule = checked
    result = sim.simulate(scheduler, num_requests=60, prompt_len=400,
                          output_len=320)
    assert result["finished"] and result["preemptions"] > 0
    assert steps[0] > 100


def test_sim_without_prefill_transient_holds_only_compacted_blocks(model_dir):
    """The what-if mode of benchmarks/scheduler_sim.py: prompts are never
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
    """Per-request facts the manager keeps (compaction end, prompt given
    back) are dropped with the request: after recompute preemption the
    re-prefill holds its whole prompt and its fresh compacted blocks, then
    gives the prompt back again."""
    kv, manager = _manager(reserve=64)
    law = manager.law
    for attempt in range(2):
        a = _request("a", 300, 100)
        a.num_computed_tokens = 0
        tail = 20 * attempt  # the re-prefill recomputes outputs too
        assert kv.allocate_slots(a, 300 + tail) is not None
        assert manager._held_blocks("a") == cdiv(300 + tail, BS) + (
            law.compacted_blocks(300, tail))
        a.num_computed_tokens = 300 + tail
        assert kv.allocate_slots(a, 1) is not None  # the prompt goes back
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


def test_pacer_starts_a_burst_then_one_request_per_interval():
    """The bucket holds BURST of the steady concurrency (pool / mean blocks
    over a life); afterwards one request may start per ``1 / rate`` steps."""
    kv, manager = _manager(reserve=256, num_blocks=400, pacing=True)
    pacer, law = manager.pacer, manager.law
    prompt, out = 300, 160
    mean = np.mean([law.compacted_blocks(prompt, a) for a in range(out)])
    concurrency = (399 - cdiv(prompt, BS)) / mean
    rate, size = pacer.rate(law, prompt, out)
    assert rate == pytest.approx(concurrency / out)
    assert size == max(1.0, AdmissionPacer.BURST * concurrency)
    started = 0
    while pacer.allows(law, prompt, out):
        pacer.started(law, prompt)
        started += 1
    assert started == int(size)
    intervals = []
    for _ in range(3):
        steps = 0
        while not pacer.allows(law, prompt, out):
            pacer.new_step()
            steps += 1
        pacer.started(law, prompt)
        intervals.append(steps)
    # the first interval only tops up what the burst left of a request
    assert intervals[0] <= intervals[1]
    assert intervals[1:] == [pytest.approx(1 / rate, abs=1)] * 2
    assert pacer.allows(law, 40, out)  # never paced: 40 <= B is not compressed
    assert pacer.allows(None, prompt, out)  # nor a request with budget off


def test_pacer_learns_the_output_length_from_finished_requests():
    """Before any request finishes the pace assumes max_tokens; after, the
    mean output of finished requests (never above the candidate's limit)."""
    kv, manager = _manager(reserve=256, pacing=True)
    pacer, law = manager.pacer, manager.law
    slow, _ = pacer.rate(law, 300, 1000)
    pacer.allows(law, 300, 1000)
    assert pacer.mean_output is None
    for _ in range(3):
        pacer.finished(100)
    assert pacer.mean_output == 100
    fast, _ = pacer.rate(law, 300, 100)
    assert fast > 5 * slow  # short lives: many more requests per step
    pacer._tokens = 0.0
    pacer.new_step()
    pacer.allows(law, 300, 1000)
    assert pacer._tokens == pytest.approx(fast)
    pacer.finished(200)
    assert pacer.mean_output == pytest.approx(100 + 100 / 16)


def test_pacer_waits_for_evidence_when_answers_may_stop_early():
    """A request that may stop at EOS says nothing by its limit (a chat
    client that leaves max_tokens unset gets all of max_model_len): before
    any request finished the pacer lets it start; after, it paces it by the
    mean output of the finished ones, as it paces every request."""
    kv, manager = _manager(reserve=256, pacing=True)
    pacer, law = manager.pacer, manager.law
    size = pacer.rate(law, 300, 3700)[1]
    starts = 0
    while pacer.allows(law, 300, 3700, runs_to_limit=False) and starts < 100:
        pacer.started(law, 300)
        starts += 1
    assert starts == 100  # never held back
    burst = 0  # requests that run to their limit are paced by it
    while pacer.allows(law, 300, 3700):
        pacer.started(law, 300)
        burst += 1
    assert burst == int(size) < 5
    pacer.finished(100)
    pacer._tokens, rate = 0.0, pacer.rate(law, 300, 100)[0]
    pacer.new_step()
    assert not pacer.allows(law, 300, 3700, runs_to_limit=False)
    assert pacer._tokens == pytest.approx(rate)  # paced by the mean output


@pytest.mark.parametrize("params, expected", [
    (dict(max_tokens=50, ignore_eos=True), True),
    (dict(max_tokens=50), False),  # stops at EOS
    (dict(max_tokens=50, ignore_eos=True, stop_token_ids=[9]), False),
    (dict(max_tokens=50, ignore_eos=True, stop=["."]), False),
    (dict(max_tokens=50, min_tokens=50), True),  # must generate them all
])
def test_a_request_runs_to_its_limit_only_when_nothing_stops_it(params,
                                                                 expected):
    from vllm_sparsemm.engine.request_options import runs_to_limit
    assert runs_to_limit(SamplingParams(**params)) is expected


def test_answers_that_stop_at_eos_start_as_on_stock(model_dir, monkeypatch):
    """64 chat clients that leave max_tokens unset (each request may run to
    max_model_len) and get answers of 40-79 tokens: the limits alone say
    the pool could not hold them, the answers say it holds them easily.
    Sparsemm's admission holds nobody back, and vLLM's scheduler runs the
    load in stock's steps; pacing them by their limits (as before) held
    requests back and more than doubled their modelled time to first
    token."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_sparsemm.engine import kv_spec
    sim = _sim()
    load = dict(num_requests=192, images=8, image_len=300,
                question_len=(20, 40), output_len=0, stop_at=(40, 80))
    spec = sim.sparsemm_spec(64, 256, _scores(), head_size=8,
                             async_scheduling=True)

    def run(kind):
        waits = []
        monkeypatch.setattr(kv_spec, "_count_wait", waits.append)
        scheduler = sim.make_scheduler(
            kind, num_blocks=1800, max_batched_tokens=2048, max_num_seqs=256,
            model_dir=model_dir, prefix_caching=True, async_scheduling=True)
        result = sim.simulate(scheduler, 0, 0, 0,
                              requests=sim.chat_requests(**load), clients=64)
        assert result["finished"] and result["preemptions"] == 0
        return result, waits

    stock, _ = run(FullAttentionSpec(block_size=BS, num_kv_heads=4,
                                     head_size=8, dtype=torch.float16))
    assert stock["steps"] < 300  # the answers stopped at EOS
    ours, waits = run(spec)
    assert 64 * spec.law().compacted_blocks(340, 4096 - 340) > 1800
    assert waits == []
    assert ours["steps"] == stock["steps"]
    assert ours["ttft_mean_s"] <= 1.05 * stock["ttft_mean_s"]
    # the old rule: the pacer takes each limit for the answer's length
    allows = AdmissionPacer.allows
    monkeypatch.setattr(AdmissionPacer, "allows",
                        lambda self, law, prompt_len, out, *_: allows(
                            self, law, prompt_len, out))
    paced, waits = run(spec)
    assert "pacer" in waits
    assert paced["ttft_mean_s"] > 2 * stock["ttft_mean_s"]


def test_only_requests_that_ran_to_their_end_teach_the_pacer():
    """patches.patch_admission_inputs: vLLM frees a preempted request while
    it is still RUNNING and an aborted one as FINISHED_ABORTED; neither says
    how long requests live."""
    kv, manager = _manager(reserve=256, pacing=True)
    for status, learns in ((RequestStatus.RUNNING, False),
                           (RequestStatus.FINISHED_ABORTED, False),
                           (RequestStatus.FINISHED_LENGTH_CAPPED, True)):
        request = _request(status.name, 300, 50)
        assert kv.allocate_slots(request, 300) is not None
        request.append_output_token_ids([0] * 7)
        request.status = status
        kv.free(request)
        assert (manager.pacer.mean_output == 7) is learns
        assert not manager.req_to_blocks.get(request.request_id)


def test_pacing_spreads_a_burst_on_vllms_scheduler(model_dir):
    """A burst larger than the pool: admitted together, requests grow
    together and preempt each other; paced, they start spread over a life,
    none is preempted and the burst finishes sooner (modelled H100 time)."""
    sim = _sim()
    results = {}
    for pacing in (False, True):
        spec = sim.sparsemm_spec(64, 256, _scores(), head_size=8,
                                 admission_pacing=pacing)
        scheduler = sim.make_scheduler(spec, num_blocks=200,
                                       max_batched_tokens=1024,
                                       max_num_seqs=64, model_dir=model_dir)
        results[pacing] = sim.simulate(scheduler, num_requests=60,
                                       prompt_len=400, output_len=320)
        assert results[pacing]["finished"]
    assert results[False]["preemptions"] > 0
    assert results[True]["preemptions"] == 0
    assert results[True]["seconds"] < 0.9 * results[False]["seconds"]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_gate_counts_prompts_until_they_go_back_under_async_scheduling(
        model_dir, async_scheduling):
    """vLLM's default async scheduling processes a step's output one step
    late, so a compacted prompt goes back one step later too. On vLLM's own
    AsyncScheduler the gate's rows hold exactly each request's real blocks,
    keep counting a prompt whose compaction is in flight, and a saturated
    burst runs with no preemption."""
    sim = _sim()
    spec = sim.sparsemm_spec(64, SparseMMSettings().admission_reserve,
                             _scores(), head_size=8, admission_pacing=False,
                             async_scheduling=async_scheduling)
    scheduler = sim.make_scheduler(spec, num_blocks=160,
                                   max_batched_tokens=1024, max_num_seqs=64,
                                   model_dir=model_dir)
    assert type(scheduler).__name__ == ("AsyncScheduler" if async_scheduling
                                        else "Scheduler")
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    running_row, seen = manager._running_row, {"in flight": 0}

    def checked(rid, tracked):
        row = running_row(rid, tracked)
        blocks = manager.req_to_blocks[rid]
        assert row.held == sum(not b.is_null for b in blocks)
        if tracked.end is not None and not tracked.released:
            assert row.whole > 0 and row.release >= 1  # still counted
            seen["in flight"] += 1
        return row

    manager._running_row = checked
    result = sim.simulate(scheduler, num_requests=40, prompt_len=400,
                          output_len=160)
    assert result["finished"] and result["preemptions"] == 0
    assert seen["in flight"] > 0


def test_decode_steps_leave_the_block_law_alone(model_dir, monkeypatch):
    """A host-bound decode step asks the manager about every running
    request: past its compaction a request's list length comes from its own
    closed form (``_Tracked.list_length``), so the law is consulted a
    bounded number of times per request, not once per request per step."""
    from vllm_sparsemm.core.block_law import BlockLaw
    sim = _sim()
    calls = {"law": 0, "slots": 0}
    list_length = BlockLaw.list_length

    def counted(self, *args):
        calls["law"] += 1
        return list_length(self, *args)

    monkeypatch.setattr(BlockLaw, "list_length", counted)
    scheduler = sim.make_scheduler(
        sim.sparsemm_spec(64, 256, _scores(), head_size=8,
                          async_scheduling=True),
        num_blocks=2000, max_batched_tokens=2048, max_num_seqs=256,
        model_dir=model_dir, prefix_caching=True)
    allocate = scheduler.kv_cache_manager.allocate_slots

    def counted_slots(*args, **kwargs):
        calls["slots"] += 1
        return allocate(*args, **kwargs)

    scheduler.kv_cache_manager.allocate_slots = counted_slots
    result = sim.simulate(scheduler, 0, 0, 0, requests=sim.chat_requests(
        64, images=4, image_len=300, question_len=(20, 40), output_len=96),
        clients=32)
    assert result["finished"]
    assert calls["slots"] > 64 * 90  # every decode step of every request
    assert calls["law"] <= 2 * 64  # each one's compaction step, at most twice


@pytest.mark.parametrize("caching, reserve", [(True, 256), (False, 0)])
def test_skipped_allocations_change_no_step(model_dir, monkeypatch, caching,
                                            reserve):
    """A running request whose list already holds its slots skips vLLM's
    allocation (``SparseMMManager.slots_ready``). Through compactions,
    prefix-cache hits, async scheduling and (without the reserve)
    preemptions, every step schedules the same tokens and blocks as with
    vLLM's allocation on every call, and the skip is most decode rows'."""
    from vllm_sparsemm.engine.kv_spec import SparseMMManager
    sim = _sim()
    ready = SparseMMManager.slots_ready

    def run(skip):
        taken = [0]

        def slots_ready(self, *args):
            skipped = skip and ready(self, *args)
            taken[0] += skipped
            return skipped

        monkeypatch.setattr(SparseMMManager, "slots_ready", slots_ready)
        scheduler = sim.make_scheduler(
            sim.sparsemm_spec(64, reserve, _scores(), head_size=8,
                              async_scheduling=True),
            num_blocks=300, max_batched_tokens=1024, max_num_seqs=64,
            model_dir=model_dir, prefix_caching=caching)
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        steps, schedule = [], scheduler.schedule

        def recorded():
            out = schedule()
            cached = out.scheduled_cached_reqs
            steps.append((
                dict(out.num_scheduled_tokens),
                {new.req_id: new.block_ids for new in out.scheduled_new_reqs},
                dict(zip(cached.req_ids, cached.new_block_ids)),
                {rid: [b.block_id for b in blocks]
                 for rid, blocks in manager.req_to_blocks.items()},
                scheduler.kv_cache_manager.block_pool.get_num_free_blocks()))
            return out

        scheduler.schedule = recorded
        result = sim.simulate(scheduler, 0, 0, 0, requests=sim.chat_requests(
            48, images=4, image_len=300, question_len=(20, 40),
            output_len=96), clients=32)
        assert result["finished"]
        del result["scheduler_ms_per_step"]  # this CPU's time
        return steps, result, taken[0]

    full, full_result, _ = run(False)
    skipped, result, taken = run(True)
    assert skipped == full and result == full_result
    assert taken > 48 * 80  # most of every request's 96 decode steps
    if not reserve:
        assert result["preemptions"] > 0
