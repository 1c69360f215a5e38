"""``vllm-sparsemm plan``: what a request of a given prompt length keeps, and
the blocks it holds, computed by the block law the backend itself uses."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_sparsemm.core.block_law import BlockLaw
from vllm_sparsemm.core.budget import BudgetPlan
from vllm_sparsemm.core.pages import cdiv
from vllm_sparsemm.core.scores import (HeadScoreError, load_head_scores,
                                       resolve_score_file, shipped_score_files)
from vllm_sparsemm.engine.config import (KNOWN_SCORE_FILES, ModelShape,
                                         SparseMMSettings, resolve_scores)

def load_source(source: str, num_kv_heads: int | None,
                head_scores: str | None):
    """Scores ``[L, Hq]``, KV heads and a description of where they came
    from, for a model folder (its config.json; its score file found as the
    server would find it, or ``head_scores``), a score file or a shipped name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeadScoreError(f"{source}: a model folder needs a "
                                 f"config.json")
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(path))
        text = config.get_text_config()
        shape = ModelShape.from_hf_text_config(
            getattr(config, "architectures", None), text)
        settings = SparseMMSettings(head_scores=head_scores)
        scores, described = resolve_scores(settings, shape)
        return scores, num_kv_heads or shape.num_kv_heads, described
    file = resolve_score_file(source)
    scores = load_head_scores(file)
    if num_kv_heads is None:
        num_kv_heads = next((shape[2] for name, _, shape in KNOWN_SCORE_FILES
                             if shipped_score_files().get(name) == file),
                            scores.shape[1])
    return scores, num_kv_heads, str(file)


def plan_report(source: str, budget: int, prompt_len: int,
                block_size: int = 16, window: int = 32, ratio: float = 0.1,
                num_kv_heads: int | None = None,
                head_scores: str | None = None) -> dict:
    """The plan of one request, as one JSON-ready dict."""
    if prompt_len < 1:
        raise ValueError(f"--prompt-len must be positive, got {prompt_len}")
    settings = SparseMMSettings(budget=budget, window=window, ratio=ratio)
    scores, kv_heads, described = load_source(source, num_kv_heads,
                                              head_scores)
    law = BlockLaw(BudgetPlan.build(settings, scores, kv_heads), block_size)
    full = cdiv(prompt_len, block_size)
    compressed = law.compresses(prompt_len)
    blocks = law.compacted_blocks(prompt_len, 0) if compressed else full
    return {
        "source": source, "scores": described,
        "layers": int(scores.shape[0]), "kv_heads": kv_heads,
        "settings": {"budget": budget, "window": window, "ratio": ratio,
                     "pool_kernel": settings.pool_kernel},
        "prompt_len": prompt_len, "block_size": block_size,
        "compressed": compressed,
        "kept": law.kept(prompt_len).tolist(),
        "full_blocks": full, "compressed_blocks": blocks,
        "peak_blocks": law.peak_blocks(prompt_len),
        "ratio": full / blocks,
    }


def format_report(report: dict) -> str:
    """The report as text: the kept tokens per (layer, KV head), then blocks."""
    s = report["settings"]
    lines = [
        f"{report['source']}: {report['layers']} layers x "
        f"{report['kv_heads']} KV heads; scores {report['scores']}",
        f"budget {s['budget']}, window {s['window']}, ratio {s['ratio']}; "
        f"prompt {report['prompt_len']} tokens; block size "
        f"{report['block_size']}",
        "prompt tokens kept per KV head (rows: layers):"]
    width = len(str(max(max(row) for row in report["kept"])))
    lines += [f"  {layer:3d}: " + " ".join(f"{k:{width}d}" for k in row)
              for layer, row in enumerate(report["kept"])]
    if report["compressed"]:
        lines.append(
            f"blocks per request: {report['full_blocks']} in the full cache, "
            f"{report['compressed_blocks']} compressed "
            f"({report['ratio']:.2f}x fewer); {report['peak_blocks']} during "
            f"the step that compacts it")
    else:
        lines.append(f"not compressed (the budget is not below the prompt): "
                     f"{report['full_blocks']} blocks per request")
    return "\n".join(lines)


def write_json(report: dict) -> str:
    return json.dumps(report, indent=1)


def shipped_scores() -> list[dict]:
    """The shipped score files: name, the models they were computed for,
    their grid and KV heads."""
    known = {name: (archs, shape) for name, archs, shape in KNOWN_SCORE_FILES}
    out = []
    for name, path in sorted(shipped_score_files().items()):
        scores = load_head_scores(path)
        archs, shape = known.get(name, ((), None))
        out.append({"name": name, "architectures": list(archs),
                    "layers": int(scores.shape[0]),
                    "query_heads": int(scores.shape[1]),
                    "kv_heads": shape[2] if shape else None,
                    "path": str(path)})
    return out
