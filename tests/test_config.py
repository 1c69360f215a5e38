"""Settings from --additional-config and the environment, and score-file lookup."""

import json

import pytest
import torch

from vllm_sparsemm.config import (BudgetPlan, ModelShape, SparseMMSettings,
                                  find_score_file, resolve_scores)
from vllm_sparsemm.head_scores import HeadScoreError

VICUNA_SHAPE = ModelShape(("LlavaNextForConditionalGeneration", ), 32, 32, 32,
                          4096, 32064)


def test_defaults_are_the_papers():
    s = SparseMMSettings.from_sources({}, environ={})
    assert (s.budget, s.window, s.ratio, s.pool_kernel, s.head_scores) == (
        256, 32, 0.1, 5, None)
    assert s.decode_kernel == "triton"  # measured: docs/performance.md, lease 15


def test_additional_config_beats_environment():
    env = {"VLLM_SPARSEMM_BUDGET": "64", "VLLM_SPARSEMM_RATIO": "0.2",
           "VLLM_SPARSEMM_DEBUG_POISON": "true"}
    s = SparseMMSettings.from_sources({"sparsemm": {"budget": 128}}, environ=env)
    assert (s.budget, s.ratio, s.debug_poison) == (128, 0.2, True)


@pytest.mark.parametrize("raw, message", [
    ({"budget": 16}, "larger than the window"),
    ({"pool_kernel": 4}, "odd"),
    ({"ratio": 2}, "ratio"),
    ({"budgte": 64}, r"unknown sparsemm settings \['budgte'\]"),
    ({"budget": "many"}, "budget='many'"),
    ({"debug_poison": "maybe"}, "boolean"),
    ({"decode_kernel": "cuda"}, r"decode_kernel must be one of \['flash_attn', 'triton'\]"),
])
def test_bad_settings_fail_at_start(raw, message):
    with pytest.raises(ValueError, match=message):
        SparseMMSettings.from_sources({"sparsemm": raw}, environ={})


def test_shipped_scores_are_found_from_the_model_shape():
    assert find_score_file(*VICUNA_SHAPE.__dict__.values()) == (
        "llava-v1.6-vicuna-7b")
    scores, source = resolve_scores(SparseMMSettings(), VICUNA_SHAPE)
    assert scores.shape == (32, 32) and source.endswith(
        "llava-v1.6-vicuna-7b.json")


def test_a_model_without_scores_gets_an_error_naming_the_fix():
    shape = ModelShape(("Qwen2VLForConditionalGeneration", ), 28, 28, 4, 3584,
                       152064)
    with pytest.raises(HeadScoreError, match="vllm-sparsemm chase.*uniform"):
        resolve_scores(SparseMMSettings(), shape)


def test_uniform_fallback_is_plain_snapkv():
    shape = ModelShape(("X", ), 4, 8, 2, 64, 100)
    scores, source = resolve_scores(SparseMMSettings(head_scores="uniform"),
                                    shape)
    assert "SnapKV" in source
    plan = BudgetPlan.build(SparseMMSettings(budget=64, head_scores="uniform"),
                            scores, 2)
    assert set(x for row in plan.caps for x in row) == {32}


def test_explicit_score_file_must_fit_the_model(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({f"{l}-{h}": [1.0] for l in range(2)
                                for h in range(3)}))
    shape = ModelShape(("X", ), 4, 8, 2, 64, 100)
    with pytest.raises(HeadScoreError, match="2 layers x 3 query heads"):
        resolve_scores(SparseMMSettings(head_scores=str(path)), shape)


def test_budget_plan_is_hashable_and_pickles():
    import pickle
    plan = BudgetPlan.build(SparseMMSettings(budget=64), torch.ones(2, 4), 2)
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert hash(plan) == hash(pickle.loads(pickle.dumps(plan)))


def test_readme_documents_every_setting():
    import dataclasses
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for field in dataclasses.fields(SparseMMSettings):
        assert f"| `{field.name}` |" in readme, field.name

