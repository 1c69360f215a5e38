"""Properties of the block law and of the engine, for random settings (hypothesis).

For random budgets, windows, prompt lengths, block sizes, TP sizes and max
lengths: a compacted request never holds more blocks than its full cache,
never fewer than its kept tokens need, and its list never outgrows the
workers' block-table row. On the CPU engine (vLLM's own KV manager and block
table), random schedules with preemptions and re-prefills keep the
scheduler's and the workers' blocks in agreement at every step.
"""

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from cpu_engine import Engine
from vllm_sparsemm.core.block_law import BlockLaw
from vllm_sparsemm.core.budget import BudgetPlan
from vllm_sparsemm.engine.config import SparseMMSettings
from vllm_sparsemm.core.pages import cdiv


@st.composite
def laws(draw):
    """A block law for a random model shape, score grid and setting."""
    layers = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2]))
    tp = draw(st.sampled_from([t for t in (1, 2, 4) if kv_heads % t == 0]))
    window = draw(st.integers(1, 40))
    budget = draw(st.integers(window + 1, 400))
    ratio = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    block_size = draw(st.sampled_from([1, 4, 16, 32]))
    seed = draw(st.integers(0, 2**16))
    scores = torch.rand(layers, kv_heads * group,
                        generator=torch.Generator().manual_seed(seed)) ** 3
    scores[0, 0] += 1e-3  # a positive sum
    plan = BudgetPlan.build(SparseMMSettings(budget=budget, window=window,
                                             ratio=ratio), scores, kv_heads)
    return BlockLaw(plan, block_size, tp)


@settings(max_examples=300, deadline=None)
@given(law=laws(), data=st.data())
def test_compacted_blocks_lie_between_the_kept_tokens_and_the_full_cache(
        law, data):
    budget, bs = law.plan.budget, law.block_size
    prompt = data.draw(st.integers(budget + 1, budget + 3000))
    appended = data.draw(st.integers(0, 2000))
    blocks = law.compacted_blocks(prompt, appended)
    assert blocks <= cdiv(prompt + appended, bs)
    kept = law.kept(prompt)
    per = law.heads_per_rank
    for rank in range(law.tp_size):
        heads = kept[:, rank * per:(rank + 1) * per]
        pages = int(cdiv(heads + appended, bs).sum())
        assert blocks >= cdiv(pages, heads.numel())


@settings(max_examples=200, deadline=None)
@given(law=laws(), data=st.data())
def test_no_list_outgrows_the_block_table_row(law, data):
    max_len = data.draw(st.integers(1, 1500))
    width = law.max_list_length(max_len)
    prompt = data.draw(st.integers(1, max_len))
    end = data.draw(st.integers(prompt, max_len))
    tokens = data.draw(st.integers(end, max_len))
    previous = 0
    for n in sorted({end, (end + tokens) // 2, tokens}):
        length = law.list_length(prompt, end, n)
        assert previous <= length <= width  # append-only, inside the row
        previous = length
    assert law.list_length(prompt, None, end) <= width


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16),
       prompts=st.lists(st.integers(20, 140), min_size=1, max_size=4),
       chunk=st.sampled_from([7, 16, 33, 512]),
       caching=st.booleans(), data=st.data())
def test_random_schedules_keep_scheduler_and_workers_in_step(
        seed, prompts, chunk, caching, data):
    """Random prompts, chunks, decode lengths and preemptions: every output
    equals dense SparseMM attention (so every page the workers read is the
    request's own), every row holds the manager's list, and the pool
    returns to where it started."""
    eng = Engine(seed=seed, num_blocks=160, caching=caching,
                 max_model_len=256)
    names = [f"r{i}" for i in range(len(prompts))]
    decode = {rid: data.draw(st.integers(1, 30)) for rid in names}
    for rid, prompt in zip(names, prompts):
        eng.add(rid, prompt, prompt + decode[rid] + 40)
    left = dict(decode)
    preempt_once = {rid: data.draw(st.booleans()) for rid in names}
    while left:
        schedule = {}
        for rid in list(left):
            request = eng.requests[rid]
            # as vLLM's scheduler: a (re-)prefill covers the prompt and any
            # outputs a preemption threw away, in chunks
            if request.num_computed_tokens < request.num_tokens:
                schedule[rid] = min(chunk, request.num_tokens -
                                    request.num_computed_tokens)
            else:
                schedule[rid] = 1
        tokens, outputs = eng.step(schedule)
        eng.processed(schedule)
        eng.check(tokens, outputs)
        for rid, n in schedule.items():
            request = eng.requests[rid]
            if request.num_computed_tokens > max(request.num_tokens - 1,
                                                 request.num_prompt_tokens):
                left[rid] -= 1
            if left[rid] == 0:
                del left[rid]
                eng.finish(rid)
            elif (preempt_once[rid] and request.num_computed_tokens >
                  request.num_prompt_tokens + 2):
                preempt_once[rid] = False
                # recompute preemption: outputs become prompt-like tokens
                # that the re-prefill computes again, then compacts
                done = request.num_computed_tokens
                request.append_output_token_ids(
                    list(range(done - request.num_prompt_tokens -
                               len(request.output_token_ids))))
                eng.preempt(rid)
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start
