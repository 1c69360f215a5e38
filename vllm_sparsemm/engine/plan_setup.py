"""Turn a vLLM engine config into sparsemm settings and a budget plan (once per process)."""

from __future__ import annotations

from vllm_sparsemm.core.budget import BudgetPlan
from vllm_sparsemm.engine.config import (ModelShape, SparseMMSettings,
                                         resolve_scores)

_cache: dict = {}


def settings_for(vllm_config) -> SparseMMSettings:
    return SparseMMSettings.from_sources(vllm_config.additional_config)


def budget_plan(vllm_config) -> tuple[BudgetPlan, str]:
    """The model's budget plan and where its scores came from."""
    model = vllm_config.model_config
    settings = settings_for(vllm_config)
    shape = ModelShape.from_hf_text_config(
        getattr(model.hf_config, "architectures", None), model.hf_text_config)
    key = (settings, shape)
    if key not in _cache:
        scores, source = resolve_scores(settings, shape)
        _cache[key] = (BudgetPlan.build(settings, scores, shape.num_kv_heads),
                       source)
    return _cache[key]
