"""Per-request budgets: ``vllm_xargs`` / ``SamplingParams.extra_args``
``{"sparsemm_budget": B}`` (0 or "off": no compression).

Validation is the client's error where vLLM checks sampling parameters (HTTP
400 from the server, ValueError offline); the scheduler's block law, its
admission gate and the workers then follow each request's own plan.
"""

import pytest
import torch
from vllm.entrypoints.serve.utils.error_response import create_error_response
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from cpu_engine import BS, BUDGET, WINDOW, Engine, chunks
from vllm_sparsemm.engine import patches
from vllm_sparsemm.engine.plugin import register
from vllm_sparsemm.engine.request_options import (BUDGET as KEY,
                                                  check_request_options,
                                                  request_budget)


@pytest.mark.parametrize("value, budget", [
    (128, 128), ("128", 128), (0, 0), ("off", 0), ("OFF", 0), (WINDOW + 1,
                                                               WINDOW + 1)])
def test_valid_budgets_are_normalised_to_ints(value, budget):
    extra = {KEY: value, "other_plugin": 1}
    check_request_options(extra, WINDOW)
    assert extra == {KEY: budget, "other_plugin": 1}
    assert request_budget(extra) == budget
    assert request_budget(None) is None and request_budget({}) is None


@pytest.mark.parametrize("extra, words", [
    ({KEY: -5}, "sparsemm_budget must be an integer above the window (8)"),
    ({KEY: WINDOW}, "got 8"),
    ({KEY: "x"}, "got 'x'"),
    ({KEY: 12.5}, "got 12.5"),
    ({KEY: True}, "got True"),
    ({KEY: [64]}, "got [64]"),
    ({"sparsemm_bogus": 1}, "unknown per-request sparsemm option "
                            "'sparsemm_bogus'; the only one is "
                            "'sparsemm_budget'"),
])
def test_invalid_options_are_the_clients_error(extra, words):
    with pytest.raises(VLLMValidationError, match=words.replace(
            "(", r"\(").replace(")", r"\)").replace("[", r"\[").replace(
                "]", r"\]")) as error:
        check_request_options(extra, WINDOW)
    assert error.value.parameter.startswith("vllm_xargs.sparsemm_")
    # what vLLM's server answers for it: a 400 naming the field
    response = create_error_response(error.value)
    assert response.error.code == 400
    assert "sparsemm_" in response.error.message


def test_sampling_params_are_checked_once_a_sparsemm_engine_is_configured(
        monkeypatch):
    """The API server builds every request's SamplingParams after its
    sparsemm engine config: a bad budget fails right there (the server's
    ValueError handler makes it a 400, before any streaming starts)."""
    register()
    monkeypatch.setattr(patches, "_request_window", None)
    SamplingParams(extra_args={KEY: -5})  # no sparsemm engine: untouched
    monkeypatch.setattr(patches, "_request_window", WINDOW)
    with pytest.raises(ValueError, match="sparsemm_budget must be"):
        SamplingParams(extra_args={KEY: -5})
    params = SamplingParams.from_optional(extra_args={KEY: "off"})
    assert params.extra_args == {KEY: 0}


def test_a_chat_request_with_a_bad_budget_fails_before_generation(
        monkeypatch):
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest)
    register()
    monkeypatch.setattr(patches, "_request_window", WINDOW)
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}],
        vllm_xargs={KEY: -5})
    with pytest.raises(VLLMValidationError):
        request.to_sampling_params(16, {})
    good = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}],
        vllm_xargs={KEY: 96})
    assert good.to_sampling_params(16, {}).extra_args == {KEY: 96}


def test_requests_of_several_budgets_share_a_batch(monkeypatch):
    """The server's budget, a smaller and a larger one, one at least the
    prompt (nothing compressed) and one off: every output equals dense
    SparseMM attention under the request's own budget, and each holds the
    blocks its own law counts."""
    monkeypatch.setattr(patches, "_request_window", WINDOW)
    eng = Engine()
    budgets = {"default": None, "small": 20, "large": 70, "whole": 500,
               "off": 0}
    decode = 12
    for rid, budget in budgets.items():
        eng.add(rid, 100, 100 + decode, budget=budget)
    plans = {rid: chunks(100, 48) + [1] * decode for rid in budgets}
    for _, tokens, outputs in eng.run(plans):
        eng.check(tokens, outputs)
    held = {}
    for rid, budget in budgets.items():
        law = eng.book.law(budget)
        if law is None or not law.compresses(100):
            want = -(-(100 + decode) // BS)
        else:
            want = law.compacted_blocks(100, decode)
        held[rid] = eng.held_blocks(rid)
        assert held[rid] == want, rid
    assert held["small"] < held["default"] < held["large"] < held["whole"]
    assert held["whole"] == held["off"]
    for rid in budgets:
        eng.finish(rid)
    assert eng.kv.block_pool.get_num_free_blocks() == eng.free_at_start


def test_laws_are_kept_per_budget_with_a_bound():
    eng = Engine()
    book = eng.book
    assert book.law(None) is book.default and book.law(BUDGET) is book.default
    assert book.law(0) is None
    first = book.law(60)
    assert book.law(60) is first  # kept
    for budget in range(61, 61 + book.MAX_BUDGETS + 1):
        book.law(budget)
    assert book.law(60) is not first  # dropped, least recently used
    assert torch.equal(book.law(60).caps, first.caps)  # and rebuilt alike
