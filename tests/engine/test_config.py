"""Settings from --additional-config and the environment, and score-file lookup."""

import json

import pytest
import torch

from vllm_sparsemm.core.budget import BudgetPlan
from vllm_sparsemm.engine.config import (ModelShape, SparseMMSettings,
                                         find_score_file, resolve_scores)
from vllm_sparsemm.core.scores import HeadScoreError

VICUNA_SHAPE = ModelShape(("LlavaNextForConditionalGeneration", ), 32, 32, 32,
                          4096, 32064)


def test_defaults_are_the_papers():
    s = SparseMMSettings.from_sources({}, environ={})
    assert (s.budget, s.window, s.ratio, s.pool_kernel, s.head_scores) == (
        256, 32, 0.1, 5, None)
    assert s.decode_kernel == "triton"  # docs/benchmarks.md: the faster


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


@pytest.mark.parametrize("raw, message", [
    ({"budget": 128.7}, r"budget=128.7 .*whole number"),
    ({"window": True}, r"window=True .*whole number.*not true/false"),
    ({"pool_kernel": "5.0"}, r"pool_kernel='5.0' .*whole number"),
    ({"budget": [64]}, r"budget=\[64\] .*whole number"),
    ({"ratio": True}, r"ratio=True .*number such as 0.1"),
    ({"ratio": "a tenth"}, r"ratio='a tenth' .*number"),
    ({"head_scores": 5}, r"head_scores=5 .*string: a score-file path"),
    ({"decode_kernel": 1}, r"decode_kernel=1 .*string: one of"),
    ({"debug_poison": 1}, r"debug_poison=1 .*boolean: true or false"),
    ({"full_cuda_graphs": "off"}, r"full_cuda_graphs='off' .*boolean"),
])
def test_settings_are_not_coerced(raw, message):
    """Strict types: a silent 128.7 -> 128 or true -> 1 would run the wrong setting."""
    with pytest.raises(ValueError, match=message) as err:
        SparseMMSettings.from_sources({"sparsemm": raw}, environ={})
    assert "(from --additional-config)" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("section", [5, "budget=64", [{"budget": 64}], True,
                                     ""])
def test_sparsemm_section_must_be_an_object(section):
    with pytest.raises(ValueError,
                       match=r'"sparsemm" must be a JSON object of settings'):
        SparseMMSettings.from_sources({"sparsemm": section}, environ={})


def test_a_null_section_means_defaults():
    assert SparseMMSettings.from_sources({"sparsemm": None},
                                         environ={}) == SparseMMSettings()


@pytest.mark.parametrize("name, value, message", [
    ("BUDGET", "64.5", "whole number"),
    ("BUDGET", "", "whole number"),
    ("RATIO", "0.1.2", "number"),
    ("ADMISSION_PACING", "maybe", "boolean"),
])
def test_bad_environment_values_name_the_variable(name, value, message):
    with pytest.raises(ValueError, match=(
            f"sparsemm setting {name.lower()}={value!r} "
            f"\\(from VLLM_SPARSEMM_{name}\\): .*{message}")):
        SparseMMSettings.from_sources({}, environ={f"VLLM_SPARSEMM_{name}": value})


def test_valid_values_in_either_source():
    env = {"VLLM_SPARSEMM_WINDOW": "16", "VLLM_SPARSEMM_RATIO": "1",
           "VLLM_SPARSEMM_FULL_CUDA_GRAPHS": "No",
           "VLLM_SPARSEMM_ADMISSION_PACING": "YES"}
    s = SparseMMSettings.from_sources(
        {"sparsemm": {"budget": 64.0, "pool_kernel": 3, "ratio": 0,
                      "debug_poison": "true", "admission_reserve": -1}},
        environ=env)
    assert (s.budget, s.window, s.ratio, s.pool_kernel, s.admission_reserve,
            s.full_cuda_graphs, s.admission_pacing, s.debug_poison) == (
                64, 16, 0.0, 3, -1, False, True, True)
    assert type(s.budget) is int and type(s.ratio) is float
    assert hash(s) == hash(SparseMMSettings(**s.__dict__))


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
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for field in dataclasses.fields(SparseMMSettings):
        assert f"| `{field.name}` |" in readme, field.name

