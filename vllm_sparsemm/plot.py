"""Draw a score file as a layer x head heat map, beside the budgets it implies."""

from __future__ import annotations

from pathlib import Path

from vllm_sparsemm.budget import head_budgets
from vllm_sparsemm.head_scores import load_head_scores


def plot_scores(scores_path: str | Path, out: str | Path, budget: int = 256,
                num_kv_heads: int | None = None, window: int = 32,
                ratio: float = 0.1) -> Path:
    """Write a PNG: normalised head scores (left), tokens kept per KV head (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scores = load_head_scores(scores_path)
    num_layers, num_heads = scores.shape
    kv_heads = num_kv_heads or num_heads
    caps = head_budgets(scores, kv_heads, budget, window, ratio) + window
    share = scores / scores.sum()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    image = left.imshow(share.T.numpy(), aspect="auto", cmap="viridis",
                        origin="lower")
    left.set(title=f"visual-head score share ({Path(scores_path).name})",
             xlabel="layer", ylabel="query head")
    fig.colorbar(image, ax=left)
    image = right.imshow(caps.T.numpy(), aspect="auto", cmap="magma",
                         origin="lower")
    right.set(title=f"tokens kept per KV head at budget {budget} "
              f"(window {window}, ratio {ratio})", xlabel="layer",
              ylabel="KV head")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
