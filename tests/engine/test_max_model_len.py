"""Requests decoding up to ``max_model_len``, on vLLM's own KV manager and
block table (the runner's rows sized by ``spec.max_num_blocks_per_req``).

A compacted request's list is its prompt entries plus its compacted blocks
(``block_law``), which near ``max_model_len`` is longer than vLLM's default
row of ``cdiv(max_len, block_size)``: a row that narrow once dropped an entry
silently and put a head's new page on its previous one. The spec sizes the
row from the law's longest list, and a page past the row is an error, never
a clamp.
"""

import pytest

from cpu_engine import BS, BUDGET, Engine, chunks
from vllm_sparsemm.core.pages import cdiv

CASES = [(max_len, prompt) for max_len in (97, 203)
         for prompt in (BUDGET + 1, BUDGET + 9, max_len // 2, max_len - 17,
                        max_len - 1)]


def _to_the_limit(eng, prompt, max_len, chunk=48, check_every=9):
    """One request from its prompt to ``max_len`` tokens; dense checks on
    every ``check_every``-th step and the last ones."""
    eng.add("r", prompt, max_len)
    plan = chunks(prompt, chunk) + [1] * (max_len - prompt)
    step = 0
    for step, (schedule, tokens, outputs) in enumerate(eng.run({"r": plan})):
        if step % check_every == 0 or len(plan) < 3:
            eng.check(tokens, outputs)
    assert eng.requests["r"].num_computed_tokens == max_len
    eng.finish("r")
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start


def test_the_cases_reach_past_vllms_default_row():
    """Some of these requests hold a list longer than cdiv(max_len, bs) at
    the end: without the spec's width they would overflow the row."""
    eng = Engine(max_model_len=203)
    longer = [(max_len, prompt) for max_len, prompt in CASES
              if eng.law.list_length(prompt, prompt, max_len)
              > cdiv(max_len, BS)]
    assert len(longer) >= 3


@pytest.mark.parametrize("max_len, prompt", CASES)
def test_every_step_up_to_max_model_len_reads_its_own_pages(max_len, prompt):
    eng = Engine(max_model_len=max_len, num_blocks=64)
    _to_the_limit(eng, prompt, max_len)


def test_a_row_narrower_than_the_law_fails_loudly():
    """The failure mode: rows of vLLM's default width. The page that falls
    past the row raises instead of landing on another page."""
    max_len, prompt = 160, BUDGET + 9
    eng = Engine(max_model_len=max_len, num_blocks=64,
                 width=cdiv(max_len, BS))
    assert eng.law.list_length(prompt, prompt, max_len) > eng.width
    with pytest.raises(RuntimeError, match="past the"):
        _to_the_limit(eng, prompt, max_len, check_every=10**9)


def test_memory_per_request_is_the_prompt_and_its_compacted_blocks():
    """vLLM's start-up check and its logged concurrency divide the pool by
    ``max_memory_usage_bytes``: what one max-length request holds at its
    compaction step, not the row width (released entries hold nothing)."""
    import types
    eng = Engine(max_model_len=203)
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(max_model_len=203))
    blocks = eng.spec.max_memory_usage_bytes(config) // eng.spec.page_size_bytes
    assert blocks == cdiv(203, BS) + eng.law.compacted_blocks(203, 0)
    assert blocks < eng.width
    # every request's peak up to 203 tokens, at its compaction step
    assert blocks == max(cdiv(p, BS) + eng.law.compacted_blocks(p, 0)
                         for p in range(BUDGET + 1, 204))


def test_start_up_says_what_a_max_length_request_holds(monkeypatch):
    """vLLM refuses a pool too small for one max-length request; the log
    says why sparsemm needs more blocks than stock for it."""
    import types

    from vllm_sparsemm.engine import kv_spec
    said = []
    monkeypatch.setattr(kv_spec.logger, "info_once",
                        lambda msg, *args: said.append(msg % args))
    eng = Engine(max_model_len=203)
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(max_model_len=203))
    blocks = eng.spec.max_memory_usage_bytes(config) // eng.spec.page_size_bytes
    more = eng.law.compacted_blocks(203, 0)
    assert said == [f"sparsemm: one request of max_model_len (203 tokens) "
                    f"holds up to {blocks} KV blocks while its prompt "
                    f"compacts, {more} more than without compression"]


def test_the_managers_closed_form_list_length_is_the_laws():
    """The manager sizes every decode step's list without calling the law
    (``_Tracked.list_length``); it must equal ``BlockLaw.list_length`` for
    any prompt, compaction end and length, re-prefills (E > P) included."""
    import numpy as np

    from vllm_sparsemm.engine.kv_spec import _Tracked
    eng = Engine(max_model_len=203)
    rng = np.random.default_rng(0)
    for budget in (None, BUDGET + 16):
        law = eng.spec.book().law(budget)
        for prompt in rng.integers(law.plan.budget + 1, 160, size=40):
            prompt = int(prompt)
            for end in (prompt, prompt + int(rng.integers(1, 40))):
                tracked = _Tracked(prompt, 203, law)
                assert tracked.compressed
                assert tracked.list_length(end) == law.list_length(
                    prompt, end, end)  # the compaction step, before set_end
                tracked.set_end(end, 0)
                for tokens in range(end, 204):
                    assert tracked.list_length(tokens) == \
                        law.list_length(prompt, end, tokens)
