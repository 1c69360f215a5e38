"""Decode steps that full CUDA graphs can replay (setting ``full_cuda_graphs``).

A captured graph replays the same kernels on the same addresses every step.
So a uniform decode step (one token per row, no row still in its prompt) runs
one path whatever its rows are: every row is a set of (row, KV head) sequences
on per-head pages, and every tensor the attention reads lives in a buffer
allocated once. An uncompressed row is a compressed row with the identity plan
(no kept pages, head ``f``'s pages at sub-page ``f`` of each of its blocks),
which is exactly vLLM's standard layout. Rows vLLM pads the batch with hold no
keys and write their token into block 0, vLLM's null block, which no request
ever owns. Steps that do more (window queries, selection, compaction) run
piecewise: ``patches.patch_full_graph_dispatch`` keeps FULL graphs off them
and tells the builder which steps run FULL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_sparsemm.engine.host_arrays import distinct_tables, upload
from vllm_sparsemm.engine.step_plan import CompressedRows
from vllm_sparsemm.engine.step_rows import StepRows
from vllm_sparsemm.engine.worker_state import WorkerKVState


@dataclass
class DecodeBuffers:
    """What a replayed decode step reads, for up to ``capacity`` rows."""
    tables: torch.Tensor  # [C, 4, F] plan table rows (see RequestKV.tables)
    prompt: torch.Tensor  # [C, 1] n_c per row
    write_rows: torch.Tensor  # [L, C * Hkv] where each new token goes
    lengths: torch.Tensor  # [L, C * Hkv] int32 keys per sequence
    starts: torch.Tensor  # [C * Hkv + 1] int32: one query per sequence


class GraphDecode:
    """The fixed-shape decode path of one worker (see the module docstring)."""

    def __init__(self, max_model_len: int, capacity: int):
        self.max_model_len = max_model_len  # bounds any head's length
        self.capacity = capacity  # rows: max(max_num_seqs, largest capture)
        self.buffers: DecodeBuffers | None = None
        self._identity: torch.Tensor | None = None  # [4, F], with the buffers

    def check_uniform_decode(self, rows, num_reqs: int,
                             num_tokens: int) -> None:
        """Fail loudly unless a FULL step is a uniform decode step: one token
        per row (padded rows included) and no row in its prompt (the
        dispatch patch rules those out). ``rows`` (a sequence of
        ``RowInfo``) is None in vLLM's dummy and capture runs, whose rows
        are all padding."""
        steps = StepRows.of(rows or [])
        if (num_tokens != num_reqs or num_reqs > self.capacity
                or (steps.scheduled != 1).any()
                or (steps.computed < steps.prompt_len).any()):
            raise RuntimeError(
                f"sparsemm: vLLM runs a FULL CUDA graph for a step that is "
                f"not a uniform decode ({num_tokens} tokens, {num_reqs} rows, "
                f"capacity {self.capacity}); set full_cuda_graphs to false "
                f"and report this")

    def rows(self, state: WorkerKVState, rows, num_reqs: int,
             block_table: torch.Tensor) -> CompressedRows:
        """Every row of the step (a sequence of ``RowInfo``, None for all
        padding) as compressed rows in the fixed buffers.

        Array arithmetic, with Python work only to look up each compressed
        row's request: a host-bound decode step may hold hundreds of rows.
        """
        device = block_table.device
        buffers = self._buffers(state, device)
        steps = StepRows.of(rows or [])
        # per row: token offset, sequence offset, n_c; the identity plan
        # for plain rows (token i is the head's i-th token) and padding
        # (one token into block 0, no keys)
        per_row = np.zeros((num_reqs, 3), dtype=np.int64)
        which = np.zeros(num_reqs, dtype=np.int64)  # 0: the identity plan
        real = len(steps)
        known = np.array([req_id in state.requests
                          for req_id in steps.req_ids], dtype=bool)
        compressed = np.flatnonzero(known)
        state.check_unseen(steps, np.flatnonzero(~known))
        shift = np.zeros(real, dtype=np.int64)
        shift[compressed] = steps.prompt_len[compressed]
        per_row[:real, 0] = steps.computed - shift
        per_row[:real, 1] = steps.end - shift
        tables = [self._identity]
        if len(compressed):
            reqs = state.compacted_requests(steps, compressed.tolist())
            per_row[compressed, 2] = [req.prompt_entries for req in reqs]
            distinct, index = distinct_tables([req.tables for req in reqs])
            tables += distinct
            which[compressed] = index + 1
        values, which = upload([per_row, which], device)
        r, heads = num_reqs, state.num_kv_heads
        buffers.tables[:r].copy_(torch.stack(tables)[which])
        buffers.prompt[:r, 0].copy_(values[:, 2])
        arange = torch.arange(r, device=device)
        return CompressedRows(
            rows=list(range(r)), tokens=arange, token_req=arange,
            token_offset=values[:, 0], seq_offset=values[:, 1],
            query_lens=[1] * r,
            prefix_pages=buffers.tables[:r, 0],
            prefix_start=buffers.tables[:r, 1],
            decode_base=buffers.tables[:r, 2], counts=buffers.tables[:r, 3],
            prompt_entries=buffers.prompt[:r],
            block_rows=block_table[:r],
            # one token per row: the sequences are views of the query
            # (``leading``), so no per-sequence query index is needed
            virtual_token=None, virtual_head=None,
            virtual_starts=buffers.starts[:r * heads + 1],
            max_query_len=1, max_length=self.max_model_len, leading=True)

    def pin(self, cr: CompressedRows) -> None:
        """Move the step's write rows and lengths into the fixed buffers."""
        buffers, used = self.buffers, cr.write_rows.shape[1]
        buffers.write_rows[:, :used].copy_(cr.write_rows)
        buffers.lengths[:, :used].copy_(cr.lengths)
        cr.write_rows = buffers.write_rows[:, :used]
        cr.lengths = buffers.lengths[:, :used]

    def _buffers(self, state: WorkerKVState, device) -> DecodeBuffers:
        if self.buffers is None or self.buffers.tables.device != torch.device(
                device):
            c, heads = self.capacity, state.num_kv_heads
            flat = state.num_layers * heads
            self.buffers = DecodeBuffers(
                tables=torch.zeros(c, 4, flat, dtype=torch.int64,
                                   device=device),
                prompt=torch.zeros(c, 1, dtype=torch.int64, device=device),
                write_rows=torch.zeros(state.num_layers, c * heads,
                                       dtype=torch.int64, device=device),
                lengths=torch.zeros(state.num_layers, c * heads,
                                    dtype=torch.int32, device=device),
                starts=torch.arange(c * heads + 1, dtype=torch.int32,
                                    device=device))
            # the identity plan's table: a plan with no kept tokens
            self._identity = state.page_plan(torch.zeros(
                state.num_layers, heads, dtype=torch.int64), device)[1]
        return self.buffers
