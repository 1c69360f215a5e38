"""Prefix caching under sparsemm, on vLLM's own KV manager with caching on.

Compaction copies out of place, so a compressed request's full prompt blocks
go back to the pool untouched and hashed: later requests with the same
prefix hit them. A hit stops short of the last W prompt tokens (their
queries choose what each head keeps), and never covers compacted blocks.
Outputs are checked against dense SparseMM attention, and kept positions
against a run with caching off.
"""

import pytest
import torch

from cpu_engine import BS, BUDGET, WINDOW, Engine, chunks

IMAGE = list(range(5000, 5200))  # a shared prefix (an image's tokens)


def _run(eng, rid, tokens, decode, chunk=512, check=True, room=0):
    """Prefill ``tokens`` (after any cache hit) in chunks, then decode
    (``room``: activations for that many more tokens)."""
    prompt = len(tokens)
    eng.add(rid, prompt, prompt + decode + room, tokens=tokens)
    plan = chunks(prompt, chunk) + [1] * decode
    hits = None
    while plan:
        n = plan.pop(0)
        before = eng.requests[rid].num_computed_tokens
        tokens_run, outputs = eng.step({rid: n})
        if hits is None:  # the first step looked the prefix up
            hits = eng.requests[rid].num_computed_tokens - len(tokens_run)
            left = prompt - eng.requests[rid].num_computed_tokens
            plan = chunks(left, chunk) + [1] * decode if left else (
                [1] * (decode - 1))
        eng.processed([rid])
        if check:
            eng.check(tokens_run, outputs)
        assert eng.requests[rid].num_computed_tokens > before
    return hits


def _conversation(caching, record=False, **engine_options):
    """Three requests sharing an image, a repeat of the first, and a second
    turn that sends the first turn's prompt plus an answer and a question."""
    eng = Engine(caching=caching, num_blocks=200, **engine_options)
    if record:
        eng.state.recorded = {}
    hits = {}
    first = IMAGE + list(range(10, 30))  # 220 tokens
    hits["a"] = _run(eng, "a", first, 6)
    eng.finish("a")
    hits["repeat"] = _run(eng, "repeat", first, 6)
    eng.finish("repeat")
    hits["other question"] = _run(eng, "other question",
                                  IMAGE + list(range(40, 75)), 6)
    eng.finish("other question")
    second_turn = first + list(range(900, 906)) + list(range(60, 90))
    hits["second turn"] = _run(eng, "second turn", second_turn, 6)
    eng.finish("second turn")
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start
    return eng, hits


def test_shared_prefixes_hit_all_but_the_observation_window():
    eng, hits = _conversation(caching=True)
    assert BUDGET < len(IMAGE)  # every prompt here is compressed
    # a repeat hits up to the block boundary at or before P - W
    assert hits["repeat"] == (220 - WINDOW) // BS * BS
    # the second turn hits the first turn's full prompt blocks (its answer
    # was never in the standard layout), the other question the image's
    assert hits["second turn"] == 220 // BS * BS
    assert hits["other question"] == (len(IMAGE) // BS) * BS
    assert hits["a"] == 0


def test_caching_changes_no_selection_and_no_output():
    """Kept positions equal a run with caching off, for every request and
    layer (outputs are checked against dense attention in both runs)."""
    cached, _ = _conversation(caching=True, record=True)
    uncached, hits = _conversation(caching=False, record=True)
    assert set(hits.values()) == {0}
    assert cached.state.recorded.keys() == uncached.state.recorded.keys()
    for rid, layers in uncached.state.recorded.items():
        for layer, (_, _, positions, counts) in layers.items():
            got = cached.state.recorded[rid][layer]
            assert torch.equal(got[2], positions) and torch.equal(got[3], counts)


def test_compacted_blocks_are_never_cached_and_prompt_blocks_are():
    eng = Engine(caching=True, num_blocks=200)
    _run(eng, "a", IMAGE, 20)
    manager, pool = eng.manager, eng.kv.block_pool
    blocks = manager.req_to_blocks["a"]
    prompt_entries = eng.law.prompt_entries(len(IMAGE))
    assert all(b.is_null for b in blocks[:prompt_entries])  # given back
    assert all(b.block_hash is None for b in blocks[prompt_entries:])
    # the prompt's full blocks stay in the cache, free but hashed
    cached = [b for b in pool.blocks if b.block_hash is not None]
    assert len(cached) == len(IMAGE) // BS
    assert all(b.ref_cnt == 0 for b in cached)
    eng.finish("a")
    assert pool.get_num_free_blocks() == eng.free_at_start


def test_a_preempted_request_takes_its_prompt_back_from_the_cache():
    eng = Engine(caching=True, num_blocks=200)
    prompt = IMAGE + list(range(10, 30))
    _run(eng, "p", prompt, 10, room=5)
    request = eng.requests["p"]
    done = request.num_computed_tokens
    request.append_output_token_ids(list(range(done - len(prompt))))
    eng.preempt("p")
    # the re-prefill hits the prompt's blocks, then recomputes the window
    # and the outputs it had produced (compacted with the prompt)
    tokens, outputs = eng.step({"p": done})
    assert tokens[0][1] == (len(prompt) - WINDOW) // BS * BS
    assert request.compaction_end == done
    eng.check(tokens, outputs)
    eng.processed(["p"])
    for _ in range(5):
        tokens, outputs = eng.step({"p": 1})
        eng.processed(["p"])
        eng.check(tokens, outputs)
    eng.finish("p")
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start


@pytest.mark.parametrize("prompt", [BUDGET - 5, BUDGET])
def test_uncompressed_prompts_cache_like_stock(prompt):
    """A prompt within the budget is never compressed: its hit may run to
    the last token, as stock vLLM's does."""
    eng = Engine(caching=True, num_blocks=200)
    tokens = list(range(7000, 7000 + prompt))
    _run(eng, "a", tokens, 3)
    eng.finish("a")
    assert _run(eng, "b", tokens, 3) == (prompt - 1) // BS * BS


@pytest.mark.parametrize("seed, tp", [(0, 1), (1, 2), (2, 1)])
def test_questions_about_one_image_in_one_step(seed, tp):
    """Several requests hit one image's cached blocks in the same step, with
    questions of their own lengths and budgets of their own (off, too):
    selected together, each output equals dense SparseMM attention."""
    gen = torch.Generator().manual_seed(seed)
    eng = Engine(caching=True, num_blocks=600, seed=seed, tp=tp)
    first = IMAGE + list(range(10, 30))
    _run(eng, "a", first, 2)
    eng.finish("a")
    rids = []
    for i in range(6):
        question = [int(t) for t in torch.randint(100, 900, (
            int(torch.randint(5, 60, (1,), generator=gen)),), generator=gen)]
        rid = f"q{i}"
        eng.add(rid, len(IMAGE) + len(question),
                len(IMAGE) + len(question) + 3, tokens=IMAGE + question,
                budget=[None, 0, 60][i % 3])
        rids.append(rid)
    tokens, outputs = eng.step(
        {rid: eng.requests[rid].num_prompt_tokens for rid in rids})
    eng.processed(rids)
    eng.check(tokens, outputs)
    computed = [sum(r == rid for r, _ in tokens) for rid in rids]
    assert all(n < len(IMAGE) // 2 for n in computed), computed  # all hit
    assert len(eng.last_plan.selection_batches) == 1
    for _ in range(2):
        tokens, outputs = eng.step({rid: 1 for rid in rids})
        eng.processed(rids)
        eng.check(tokens, outputs)


def test_a_later_turn_recomputes_the_previous_answer(tmp_path):
    """A conversation's next turn sends the previous prompt, its answer and
    a new question. Stock vLLM hits every full block the previous turn
    computed, answer included; sparsemm's hit ends with the previous
    prompt's full blocks, since decoded tokens never sit in the standard
    layout (computed under compressed attention, reusing them would change
    the answer that caching off gives). On vLLM's scheduler, per turn."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from scripts import load_script
    sim = load_script("scheduler_sim")
    model_dir = sim.write_text_model(tmp_path / "model", 4, 4)
    scores = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    answer = 40
    results = {}
    for name, spec in (("stock", FullAttentionSpec(
            block_size=BS, num_kv_heads=4, head_size=8,
            dtype=torch.float16)), ("sparsemm", sim.sparsemm_spec(
                64, 256, scores, head_size=8))):
        conversations = sim.Conversations(6, 3, 300, (10, 30), answer)
        issued = []
        turn = conversations._turn
        conversations._turn = lambda *args: issued.append(turn(*args)) or (
            issued[-1])
        scheduler = sim.make_scheduler(
            spec, num_blocks=2000, max_batched_tokens=2048, max_num_seqs=64,
            model_dir=model_dir, prefix_caching=True, async_scheduling=False)
        results[name] = sim.simulate(scheduler, 0, 0, 0,
                                     requests=conversations, clients=3)
        assert results[name]["finished"]
        prompts = {r.request_id: r.num_prompt_tokens for r in issued}
        hits = 0
        for rid, prompt in prompts.items():
            conversation, k = rid[1:].split("t")
            if k == "0":
                continue  # a new image: nothing cached
            before = prompts[f"c{conversation}t{int(k) - 1}"]
            # stock: every full block with KV (the last answer token has
            # none); sparsemm: the previous prompt's full blocks
            cached = (before + answer - 1 if name == "stock" else before)
            hits += cached // BS * BS
        assert results[name]["prefix_hit_rate"] == pytest.approx(
            hits / sum(prompts.values()))
    assert (results["sparsemm"]["prefix_hit_rate"] <
            results["stock"]["prefix_hit_rate"])


def _free_blocks_are_queued_or_parked(pool):
    """vLLM's invariant, with the tier: a free block (ref count 0, not the
    null block) is in the free queue or parked, never both; the free count
    is theirs together."""
    queued = {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
    parked = set(pool.parked)
    free = {b.block_id for b in pool.blocks
            if b.ref_cnt == 0 and not b.is_null}
    assert queued | parked == free and not queued & parked
    assert pool.get_num_free_blocks() == len(free)


def test_released_prompts_are_parked_until_their_request_ends():
    """A compacted request's prompt blocks go back free and hashed, but
    parked: counted free, handed out only once the free queue runs short
    (its last block first), a hit takes them back, and they join the queue
    when the request ends."""
    eng = Engine(caching=True, num_blocks=60)
    pool = eng.kv.block_pool
    _run(eng, "a", IMAGE, 20)
    prompt = IMAGE[:len(IMAGE) // BS * BS]
    parked = [b for b, owner in pool.parked.values()]
    assert len(parked) == len(prompt) // BS and all(
        b.block_hash is not None for b in parked)
    _free_blocks_are_queued_or_parked(pool)
    # another request takes the queue, then the parked, last block first
    queue = pool.free_block_queue.num_free_blocks
    taken = pool.get_new_blocks(queue + 2)
    assert [b.block_id for b in taken[-2:]] == [b.block_id for b in parked[
        :-3:-1]]
    _free_blocks_are_queued_or_parked(pool)
    pool.free_blocks(taken)
    # a hit on the rest of the prompt takes it out of the tier
    tokens = IMAGE + list(range(10, 40))
    hits = _run(eng, "b", tokens, 3)
    assert hits == (len(IMAGE) // BS - 2) * BS
    _free_blocks_are_queued_or_parked(pool)
    for rid in ("a", "b"):
        eng.finish(rid)
        _free_blocks_are_queued_or_parked(pool)
    assert not pool.parked and not any(pool.parked_by.values())
    assert pool.get_num_free_blocks() == eng.free_at_start


@pytest.mark.parametrize("kept", [True, False])
def test_a_waiting_request_keeps_its_hits_until_admitted(kept):
    """A waiting request's cached prompt blocks are parked until it is
    admitted: an allocation that takes every other free block leaves them,
    where the LRU order (the control, ``kept`` off) evicts them, since a
    later request's blocks were freed after them. Freed while it waits, or
    admitted, the request parks nothing."""
    eng = Engine(caching=True, num_blocks=60)
    pool = eng.kv.block_pool
    first = IMAGE + list(range(10, 30))
    _run(eng, "a", first, 4)
    eng.finish("a")
    _run(eng, "c", list(range(7000, 7000 + len(first))), 4)
    eng.finish("c")  # its blocks join the queue after a's
    tokens = first + list(range(900, 930))
    cached = len(first) // BS  # a's full blocks: b's prefix
    if kept:
        eng.manager.keep_waiting_hits([eng.add("b", len(tokens),
                                               len(tokens) + 3, tokens)])
        assert len(pool.parked) == cached
        _free_blocks_are_queued_or_parked(pool)
    taken = pool.get_new_blocks(pool.get_num_free_blocks() - cached)
    pool.free_blocks(taken)
    hits = _run(eng, "b", tokens, 3)
    assert hits == (cached * BS if kept else 0)
    assert not eng.manager._kept_for  # admitted: its hits are its own
    _free_blocks_are_queued_or_parked(pool)
    eng.finish("b")
    # a request freed while it waits (aborted) gives its parked blocks back
    eng.manager.keep_waiting_hits([eng.add("d", len(tokens), len(tokens) + 3,
                                           tokens)])
    assert pool.parked
    eng.kv.free(eng.requests["d"])
    assert not pool.parked and not eng.manager._kept_for
    _free_blocks_are_queued_or_parked(pool)
    assert pool.get_num_free_blocks() == eng.free_at_start


def test_parked_prompts_keep_conversations_hitting_on_a_full_pool(tmp_path,
                                                                  monkeypatch):
    """96 conversations of 4 turns, 48 at a time, on a pool their prompts
    and compacted blocks outgrow: the LRU order alone evicted each prompt
    before its next turn (hits 36%, against 68% with room); parked while
    their requests run, most prompts stay hits, and nobody is preempted."""
    from scripts import load_script
    from vllm_sparsemm.engine import patches
    sim = load_script("scheduler_sim")
    model_dir = sim.write_text_model(tmp_path / "model", 4, 4)
    scores = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))

    def run(num_blocks):
        spec = sim.sparsemm_spec(64, 256, scores, head_size=8,
                                 async_scheduling=True)
        scheduler = sim.make_scheduler(
            spec, num_blocks=num_blocks, max_batched_tokens=2048,
            max_num_seqs=256, model_dir=model_dir, prefix_caching=True,
            async_scheduling=True)
        result = sim.simulate(scheduler, 0, 0, 0, requests=sim.Conversations(
            96, 4, 300, (10, 30), 40), clients=48)
        assert result["finished"] and result["preemptions"] == 0
        pool = scheduler.kv_cache_manager.block_pool
        assert not pool.parked
        assert pool.get_num_free_blocks() == num_blocks - 1
        return result["prefix_hit_rate"]

    from vllm_sparsemm.engine.kv_spec import SparseMMManager
    kept, keep = set(), SparseMMManager.keep_waiting_hits

    def recorded(self, waiting):  # the scheduler's patch passes its queue
        waiting = list(waiting)
        kept.update(r.request_id for r in waiting)
        keep(self, waiting)

    monkeypatch.setattr(SparseMMManager, "keep_waiting_hits", recorded)
    roomy, parked = run(2400), run(1500)
    assert parked > 0.9 * roomy
    assert len(kept) == 96 * 4  # every turn waited (at first) and was seen
    monkeypatch.setattr(patches.ParkingBlockPool, "park",
                        lambda self, blocks, owner: None)
    assert run(1500) < 0.6 * roomy
