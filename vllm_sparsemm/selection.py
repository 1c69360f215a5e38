"""Which prompt tokens each KV head keeps (DESIGN section 1, steps 1-5).

All keys and queries are post-RoPE. Scores are computed in float32 whatever
the model dtype, so the selection does not depend on fp16/bf16 rounding of the
logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_scores(queries: torch.Tensor, keys: torch.Tensor,
                  pool_kernel: int = 5) -> torch.Tensor:
    """Pooled importance of every non-window key, per KV head.

    ``queries``: ``[W, Hq, D]``, the last W prompt positions. ``keys``:
    ``[N, Hkv, D]``, all prompt keys. Returns float32 ``[Hkv, N - W]``:
    softmax over all N keys (causal inside the window), mean over the W
    queries, restricted to keys ``[0, N - W)``, mean over the G query heads of
    each KV head, then ``avg_pool1d(kernel, padding=kernel // 2, stride=1)``
    with zero padding counted (PyTorch's default, as in the reference).
    A leading batch dimension (requests of one prompt length) is kept:
    ``[B, W, Hq, D]`` and ``[B, N, Hkv, D]`` give ``[B, Hkv, N - W]``.
    """
    if queries.ndim == 3:
        return window_scores(queries[None], keys[None], pool_kernel)[0]
    batch, window, num_heads, head_dim = queries.shape
    _, num_keys, num_kv_heads, key_dim = keys.shape
    if (key_dim != head_dim or num_heads % num_kv_heads or
            keys.shape[0] != batch):
        raise ValueError(f"queries {tuple(queries.shape)} do not fit keys "
                         f"{tuple(keys.shape)}")
    if not 0 < window < num_keys:
        raise ValueError(f"need 0 < window ({window}) < prompt length "
                         f"({num_keys})")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd and positive, got "
                         f"{pool_kernel}")
    group = num_heads // num_kv_heads
    # [B, Hkv, G * W, D]: the G query heads of a KV head share its keys
    q = queries.float().view(batch, window, num_kv_heads, group,
                             head_dim).permute(0, 2, 3, 1, 4).reshape(
                                 batch, num_kv_heads, group * window, head_dim)
    # [B, Hkv, N, D], contiguous: the matmul then reads it without a copy
    k = keys.transpose(1, 2).to(torch.float32,
                                memory_format=torch.contiguous_format)
    logits = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)
    # Window query i sits at position N - W + i and sees keys 0 .. N - W + i.
    query_pos = torch.arange(num_keys - window, num_keys,
                             device=q.device).repeat(group)
    key_pos = torch.arange(num_keys, device=q.device)
    future = key_pos[None, :] > query_pos[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # mean over the W queries and G heads together = mean of per-head means
    per_kv_head = probs[..., :num_keys - window].mean(dim=2)  # [B, Hkv, N - W]
    pooled = F.avg_pool1d(per_kv_head.reshape(-1, 1, num_keys - window),
                          kernel_size=pool_kernel, stride=1,
                          padding=pool_kernel // 2)
    return pooled.view(batch, num_kv_heads, -1)


def select_kept(scores: torch.Tensor, caps: torch.Tensor, window: int,
                max_count: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept prompt positions per KV head: the top ``cap`` scored keys plus the window.

    ``scores``: ``[Hkv, N - W]`` from :func:`window_scores`; ``caps``: int
    ``[Hkv]``. Ties go to the earlier position (stable sort). Returns
    ``(positions, counts)``: int64 ``[Hkv, max_count]`` ascending per head and
    padded with -1, and int64 ``[Hkv]`` counts ``min(cap, N - W) + W``.
    ``max_count`` is ``max(counts)`` when the caller knows it on the host.
    """
    num_kv_heads, num_scored = scores.shape
    if caps.shape != (num_kv_heads,):
        raise ValueError(f"caps must have shape [{num_kv_heads}], got "
                         f"{tuple(caps.shape)}")
    device = scores.device
    caps = caps.to(dtype=torch.int64).clamp(min=0, max=num_scored)
    if max_count is None:  # callers with device caps pass it: no sync
        max_count = int(caps.max()) + window
    caps = caps.to(device, non_blocking=True)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    rank = torch.arange(num_scored, device=device)
    keep.scatter_(1, order, rank[None, :] < caps[:, None])
    window_pos = torch.arange(num_scored, num_scored + window, device=device)
    positions = torch.cat(
        [torch.where(keep, rank, num_scored + window),
         window_pos.expand(num_kv_heads, window)], dim=1)
    counts = caps + window
    positions = positions.sort(dim=-1).values[:, :max_count]
    positions = positions.masked_fill(positions >= num_scored + window, -1)
    return positions, counts


def kept_positions(queries: torch.Tensor, keys: torch.Tensor,
                   caps: torch.Tensor, pool_kernel: int = 5
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot selection for one layer: :func:`window_scores` then :func:`select_kept`."""
    return select_kept(window_scores(queries, keys, pool_kernel), caps,
                       queries.shape[0])


class WindowQueryBuffer:
    """Collects the window queries of one layer while a prompt arrives in chunks.

    Chunked prefill may split the last W prompt positions over several steps.
    A window query at position p only attends to keys ``<= p``, all of which
    exist when p is computed, so buffering the queries and scoring once the
    last prompt token is in gives exactly the one-shot result.
    """

    def __init__(self, prompt_len: int, window: int):
        if not 0 < window < prompt_len:
            raise ValueError(f"need 0 < window ({window}) < prompt length "
                             f"({prompt_len})")
        self.prompt_len = prompt_len
        self.window = window
        self.queries: torch.Tensor | None = None
        self._seen = [False] * window  # host bookkeeping: no tensor ops

    @property
    def start(self) -> int:
        """First prompt position of the observation window."""
        return self.prompt_len - self.window

    def add(self, first_position: int, queries: torch.Tensor) -> None:
        """Offer a chunk of queries ``[T, Hq, D]`` that starts at ``first_position``."""
        lo = max(first_position, self.start)
        hi = min(first_position + queries.shape[0], self.prompt_len)
        if lo >= hi:
            return
        if self.queries is None:
            self.queries = queries.new_empty((self.window, ) +
                                             tuple(queries.shape[1:]))
        self.queries[lo - self.start:hi - self.start] = (
            queries[lo - first_position:hi - first_position])
        self._seen[lo - self.start:hi - self.start] = [True] * (hi - lo)

    @property
    def complete(self) -> bool:
        return all(self._seen)

    def ready(self) -> "WindowQueryBuffer":
        """This buffer, once every window query has arrived (raises otherwise)."""
        if not self.complete:
            missing = [self.start + i for i, seen in enumerate(self._seen)
                       if not seen]
            raise RuntimeError(f"window queries at positions "
                               f"{missing[:8]} never arrived")
        return self

    def scores(self, keys: torch.Tensor, pool_kernel: int = 5) -> torch.Tensor:
        """:func:`window_scores` of the buffered queries; ``keys`` are all N prompt keys."""
        return window_scores(self.ready().queries, keys, pool_kernel)
