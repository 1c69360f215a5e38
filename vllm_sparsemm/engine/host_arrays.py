"""The step plan's host arrays: index arithmetic in numpy, and one pinned copy
to the device per step."""

from __future__ import annotations

import numpy as np
import torch


def row_tokens(query_start: list[int], rows: list[int]) -> np.ndarray:
    """The token indices of ``rows``, in order (concatenated aranges)."""
    start = np.asarray(query_start, dtype=np.int64)
    first, lens = start[rows], np.diff(start)[rows]
    local = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(first, lens) + local


def virtual_sequences(query_lens, heads: int):
    """One attention sequence per (row, KV head), holding that row's tokens.

    Returns, in (row, head, token) order, each entry's token index (local to
    the rows given) and KV head, and the int32 sequence starts ``[R * H + 1]``
    (numpy arrays: host work stays off torch's intra-op threads, see
    ``upload``).
    """
    query_lens = np.asarray(query_lens, dtype=np.int64)
    rows = len(query_lens)
    if (query_lens == 1).all():  # decode: plain aranges
        return (np.repeat(np.arange(rows), heads),
                np.tile(np.arange(heads), rows),
                np.arange(rows * heads + 1, dtype=np.int32))
    seq_len = np.repeat(query_lens, heads)
    seq = np.repeat(np.arange(len(seq_len)), seq_len)
    seq_start = np.cumsum(seq_len) - seq_len
    row_start = np.cumsum(query_lens) - query_lens
    token = row_start[seq // heads] + np.arange(len(seq)) - seq_start[seq]
    starts = np.zeros(len(seq_len) + 1, dtype=np.int32)
    starts[1:] = np.cumsum(seq_len)
    return token, seq % heads, starts


def upload(arrays, device) -> list[torch.Tensor]:
    """Host int arrays (numpy, lists or CPU tensors) to ``device`` as int64,
    in one pinned copy.

    One copy per step instead of one per array, and from pinned memory, so
    the host never waits for the device (pageable copies can stall behind
    the queued work of the previous step). numpy fills the pinned buffer:
    torch's CPU copies split arrays this size over its intra-op threads,
    which then spin on cores the host-bound step needs (vLLM sets those
    threads to 1 for the same reason, but only in tensor-parallel workers).
    """
    arrays = [np.asarray(a, dtype=np.int64) for a in arrays]
    sizes = [a.size for a in arrays]
    kind = torch.device(device).type
    cuda = kind == "cuda"
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=cuda)
    if arrays:
        np.concatenate([a.reshape(-1) for a in arrays], out=host.numpy())
    flat = host if kind == "cpu" else host.to(device, non_blocking=cuda)
    return [part.view(a.shape) for part, a in
            zip(flat.split(sizes), arrays)]


def distinct_tables(tables: list[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], np.ndarray]:
    """Rows of one prompt length share their plan's table tensor: the distinct
    tables and, per row, which one (stack those and gather, instead of
    stacking one per row)."""
    index: dict[int, int] = {}
    distinct = []
    for table in tables:
        if id(table) not in index:
            index[id(table)] = len(distinct)
            distinct.append(table)
    return distinct, np.array([index[id(t)] for t in tables], dtype=np.int64)
