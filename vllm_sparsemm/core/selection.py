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
                  pool_kernel: int = 5,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled importance of every non-window key, per KV head.

    ``queries``: ``[W, Hq, D]``, the last W prompt positions. ``keys``:
    ``[N, Hkv, D]``, all prompt keys. Returns float32 ``[Hkv, N - W]``:
    softmax over all N keys (causal inside the window), mean over the W
    queries, restricted to keys ``[0, N - W)``, mean over the G query heads of
    each KV head, then ``avg_pool1d(kernel, padding=kernel // 2, stride=1)``
    with zero padding counted (PyTorch's default, as in the reference).
    A leading batch dimension is kept: ``[B, W, Hq, D]`` and ``[B, N, Hkv,
    D]`` give ``[B, Hkv, N - W]``. ``lengths`` (int64 ``[B]``, each in
    ``(W, N]``) batches prompts of different lengths: request b's prompt is
    its first ``lengths[b]`` keys, and its scores, the first
    ``lengths[b] - W``, are those of its prompt alone (zero after them).
    """
    if queries.ndim == 3:
        return window_scores(queries[None], keys[None], pool_kernel)[0]
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd and positive, got "
                         f"{pool_kernel}")
    return pool_scores(window_means(queries, keys, lengths), pool_kernel)


def window_means(queries: torch.Tensor, keys: torch.Tensor,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`window_scores` before the pooling: ``[B, Hkv, N - W]`` float32,
    each key's softmax probability averaged over the window queries and the
    G query heads of its KV head (zero past each prompt's scored keys). The
    reference of ``triton_ops.window_means``, which reads the keys from the
    paged cache."""
    batch, window, num_heads, head_dim = queries.shape
    _, num_keys, num_kv_heads, key_dim = keys.shape
    if (key_dim != head_dim or num_heads % num_kv_heads or
            keys.shape[0] != batch):
        raise ValueError(f"queries {tuple(queries.shape)} do not fit keys "
                         f"{tuple(keys.shape)}")
    if not 0 < window < num_keys:
        raise ValueError(f"need 0 < window ({window}) < prompt length "
                         f"({num_keys})")
    q = _grouped_queries(queries, num_kv_heads)
    logits = _logits(q, keys, head_dim)
    group = num_heads // num_kv_heads
    keys_at = torch.arange(num_keys, device=q.device)
    if lengths is None:
        future = (keys_at[None, :] > _query_positions(
            num_keys, window, group, q.device)[:, None])
    else:  # [B, 1, G * W, N]: each request's window sits at its own end
        ends = lengths.to(q.device)[:, None] - window
        query_at = (ends + torch.arange(window, device=q.device)).repeat(
            1, group)
        future = (keys_at > query_at[..., None])[:, None]
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    # mean over the W queries and G heads together = mean of per-head means
    per_kv_head = probs[..., :num_keys - window].mean(dim=2)
    if lengths is not None:  # zeros after each prompt's scored keys: the
        # pooling's zero padding, as for that prompt alone
        per_kv_head = per_kv_head.masked_fill(
            keys_at[:num_keys - window] >= ends[:, None, :], 0.0)
    return per_kv_head


def streamed_window_scores(queries: torch.Tensor, keys, num_keys: int,
                           pool_kernel: int, chunk: int) -> torch.Tensor:
    """:func:`window_scores` of a prompt too long to score at once, reading
    ``chunk`` keys at a time: scratch bounded by ``chunk``, whatever the
    prompt length.

    ``queries``: ``[B, W, Hq, D]``; ``keys(first, last)`` returns keys
    ``[B, last - first, Hkv, D]``. Two passes over the keys: the softmax's
    running maximum and sum per query, then each key's probabilities. Equal
    to :func:`window_scores` up to float32 rounding.
    """
    batch, window, num_heads, head_dim = queries.shape
    scored = num_keys - window
    if not 0 < window < num_keys:
        raise ValueError(f"need 0 < window ({window}) < prompt length "
                         f"({num_keys})")
    q = positions = high = total = None
    for first in range(0, num_keys, chunk):
        last = min(first + chunk, num_keys)
        k = keys(first, last)
        if high is None:
            q = _grouped_queries(queries, k.shape[2])
            positions = _query_positions(num_keys, window,
                                         num_heads // k.shape[2], q.device)
            high = torch.full(q.shape[:3], float("-inf"), device=q.device)
            total = torch.zeros_like(high)
        future = (torch.arange(first, last, device=q.device)[None, :] >
                  positions[:, None])
        logits = _logits(q, k, head_dim).masked_fill(future, float("-inf"))
        new_high = torch.maximum(high, logits.amax(-1))
        total = (total * torch.exp(high - new_high) +
                 torch.exp(logits - new_high[..., None]).sum(-1))
        high = new_high
    per_kv_head = torch.empty(batch, q.shape[1], scored, device=q.device)
    for first in range(0, scored, chunk):
        last = min(first + chunk, scored)
        # every window query sees every scored key: no mask
        probs = torch.exp(_logits(q, keys(first, last), head_dim) -
                          high[..., None]) / total[..., None]
        per_kv_head[..., first:last] = probs.mean(dim=2)
    return pool_scores(per_kv_head, pool_kernel)


def _grouped_queries(queries: torch.Tensor,
                     num_kv_heads: int) -> torch.Tensor:
    """``[B, Hkv, G * W, D]`` float32: the G query heads of a KV head share its keys."""
    batch, window, num_heads, head_dim = queries.shape
    group = num_heads // num_kv_heads
    return queries.float().view(batch, window, num_kv_heads, group,
                                head_dim).permute(0, 2, 3, 1, 4).reshape(
                                    batch, num_kv_heads, group * window,
                                    head_dim)


def _query_positions(num_keys: int, window: int, group: int,
                     device) -> torch.Tensor:
    """Prompt position of each ``_grouped_queries`` row: window query i sits
    at ``N - W + i`` and sees keys ``0 .. N - W + i``."""
    return torch.arange(num_keys - window, num_keys, device=device).repeat(group)


def _logits(q: torch.Tensor, keys: torch.Tensor, head_dim: int):
    """Scaled dot products ``[B, Hkv, G * W, n]`` of ``q`` with ``keys [B, n, Hkv, D]``."""
    # [B, Hkv, n, D], contiguous: the matmul then reads it without a copy
    k = keys.transpose(1, 2).to(torch.float32,
                                memory_format=torch.contiguous_format)
    return torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)


def pool_scores(per_kv_head: torch.Tensor, pool_kernel: int) -> torch.Tensor:
    """``avg_pool1d`` along the keys, zero padding counted (as the reference)."""
    batch, heads, scored = per_kv_head.shape
    pooled = F.avg_pool1d(per_kv_head.reshape(-1, 1, scored),
                          kernel_size=pool_kernel, stride=1,
                          padding=pool_kernel // 2)
    return pooled.view(batch, heads, -1)


def select_kept(scores: torch.Tensor, caps: torch.Tensor, window: int,
                max_count: int | None = None,
                lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept prompt positions per KV head: the top ``cap`` scored keys plus the window.

    ``scores``: ``[Hkv, N - W]`` from :func:`window_scores`; ``caps``: int
    ``[Hkv]``. Ties go to the earlier position (stable sort). Returns
    ``(positions, counts)``: int64 ``[Hkv, max_count]`` ascending per head and
    padded with -1, and int64 ``[Hkv]`` counts ``min(cap, N - W) + W``.
    ``max_count`` is ``max(counts)`` when the caller knows it on the host.
    ``lengths`` (int64 ``[Hkv]``, each at most ``N - W``) gives rows of
    prompts of different lengths: row r scores its first ``lengths[r]``
    keys, and its window follows them.
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
    rank = torch.arange(num_scored, device=device)
    window_pos = torch.arange(num_scored, num_scored + window, device=device)
    if lengths is None:
        window_pos = window_pos.expand(num_kv_heads, window)
    else:  # keys past a row's prompt are never kept: sorted last
        lengths = lengths.to(device)[:, None]
        scores = scores.masked_fill(rank >= lengths, float("-inf"))
        caps = torch.minimum(caps, lengths[:, 0])
        window_pos = window_pos - num_scored + lengths
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, order, rank[None, :] < caps[:, None])
    positions = torch.cat(
        [torch.where(keep, rank, num_scored + window), window_pos], dim=1)
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
