"""Decode attention of one layer: sparsemm's per-(row, KV head) FlashAttention
call against stock vLLM's call, over the same keys and values.

    python benchmarks/attention_bench.py --cases 755x265,330x770,41x350 --out attn.json

Each case ``RxT`` is R decoding rows whose every KV head holds T tokens. Stock
reads them as vLLM's FlashAttention backend lays them out (``[blocks,
block_size, Hkv, D]``, one sequence per row); sparsemm as the backend does (one
single-head sequence per (row, KV head) over the packed ``[pages, block_size,
2D]`` buffer, K and V side by side), through the backend's own
``_attend_per_kv_head``. Both hold the same values in shuffled blocks, so their
outputs must agree (checked). Two more variants show what the split count and
the packed layout cost: FlashAttention's own split heuristic, and separate K
and V page buffers; the rest time ``triton_ops.paged_decode`` (the
``decode_kernel: "triton"`` setting), which reads the packed pages in place
with a KV head's G query heads in one 16-row tile, in a few launch
configurations (``TRITON_CONFIGS``). Reported per variant: median ms per
call (CUDA graph replays) and KV bytes read per second (keys and values of
every token once), and the host's microseconds to launch one call eagerly
(``host_us``), what a step that runs attention between piecewise graphs (one
that holds a prompt) pays per layer.

A case ``RxT+NxL`` is lopsided, as compressed heads are: N KV heads of
each row hold L tokens, the rest T. It has no stock twin (stock would hold
every head at L), so its variants are checked and timed against the
per-head FlashAttention call, and the Triton kernel also runs unsplit, to
show what cutting each head's pages into parts buys.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import types


def build_case(rows: int, tokens: int, heads: int, dim: int, block_size: int,
               device, seed: int = 0, group: int = 1, long_heads: int = 0,
               long_tokens: int = 0) -> dict:
    """The same K/V twice: per-head pages (sparsemm) and vLLM's blocks (stock).
    With ``long_heads``, each row's first ``long_heads`` KV heads hold
    ``long_tokens`` (visual heads), the rest ``tokens``; stock's rows hold the
    longest for every head."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    longest = max(tokens, long_tokens if long_heads else 0)
    width = -(-longest // block_size)
    sequences = rows * heads
    # page 0 stays unused, as the null block does in vLLM's pool
    pages = torch.randn(1 + sequences * width, block_size, 2 * dim,
                        device=device, dtype=torch.float16, generator=gen)
    order = torch.randperm(sequences * width, device=device, generator=gen) + 1
    table = order.view(sequences, width).to(torch.int32)
    blocks = torch.empty(2, 1 + rows * width, block_size, heads, dim,
                         device=device, dtype=torch.float16)
    block_order = torch.randperm(rows * width, device=device, generator=gen) + 1
    block_table = block_order.view(rows, width).to(torch.int32)
    # [R*H, W, bs, 2D] -> [R, W, bs, H, 2D]: each row's blocks hold its heads
    per_row = pages[table.long()].view(rows, heads, width, block_size, 2 * dim)
    per_row = per_row.permute(0, 2, 3, 1, 4).reshape(-1, block_size, heads, 2 * dim)
    blocks[0, block_table.flatten().long()] = per_row[..., :dim]
    blocks[1, block_table.flatten().long()] = per_row[..., dim:]
    del per_row
    # vLLM's query: a strided view of the fused QKV output
    qkv = torch.randn(rows, (group + 2) * heads * dim, device=device,
                      dtype=torch.float16, generator=gen)
    lengths = torch.full((rows, heads), tokens, dtype=torch.int32)
    lengths[:, :long_heads] = long_tokens
    return {
        "query": qkv[:, :group * heads * dim].view(rows, group * heads, dim),
        "pages": pages, "table": table, "blocks": blocks,
        "block_table": block_table,
        "lengths": lengths.flatten().to(device), "longest": longest,
        "row_lengths": torch.full((rows, ), longest, device=device,
                                  dtype=torch.int32),
        "kv_bytes": 2 * int(lengths.sum()) * dim * 2,
    }


def stock_call(case: dict, scale: float):
    import torch
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
    query, blocks = case["query"], case["blocks"]
    rows, tokens = query.shape[0], case["longest"]
    starts = torch.arange(rows + 1, device=query.device, dtype=torch.int32)
    out = torch.empty_like(query)

    def call():
        flash_attn_varlen_func(
            q=query, k=blocks[0], v=blocks[1], out=out, cu_seqlens_q=starts,
            max_seqlen_q=1, seqused_k=case["row_lengths"], max_seqlen_k=tokens,
            softmax_scale=scale, causal=True, block_table=case["block_table"],
            fa_version=3)
        return out
    return call


def per_head_call(case: dict, scale: float, splits: str = "backend",
                  separate_kv: bool = False):
    """The backend's own call; ``splits="fa"`` leaves the split count to
    FlashAttention, ``separate_kv`` reads K and V from two page buffers."""
    import torch
    from vllm_sparsemm.engine import backend
    query, pages = case["query"], case["pages"]
    rows, query_heads, dim = query.shape
    sequences = case["lengths"].numel()
    group = query_heads * rows // sequences
    starts = torch.arange(sequences + 1, device=query.device, dtype=torch.int32)
    out = torch.empty_like(query)
    tokens = case["longest"]
    if separate_kv:
        keys = pages[..., :dim].contiguous().unsqueeze(2)
        values = pages[..., dim:].contiguous().unsqueeze(2)
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
        q = query.reshape(sequences, group, dim)
        flat = out.view(sequences, group, dim)
        count = backend.num_splits(sequences, backend.sm_count(query.device))

        def call():
            flash_attn_varlen_func(
                q=q, k=keys, v=values, out=flat, cu_seqlens_q=starts,
                max_seqlen_q=1, seqused_k=case["lengths"], max_seqlen_k=tokens,
                softmax_scale=scale, causal=True, block_table=case["table"],
                fa_version=3, num_splits=count)
            return out
        return call
    impl = types.SimpleNamespace(head_size=dim, num_queries_per_kv=group,
                                 scale=scale, vllm_flash_attn_version=3)
    state = types.SimpleNamespace(pages=pages, attention_views=None,
                                  scales=lambda layer: None)

    def call():
        chosen = backend.num_splits
        if splits == "fa":
            backend.num_splits = lambda *_: 0
        try:
            backend.SparseMMImpl._attend_per_kv_head(
                impl, state, 0, query, None, None, starts, case["table"],
                case["lengths"], 1, tokens, out)
        finally:
            backend.num_splits = chosen
        return out
    return call


# (warps, stages) of the Triton kernel to time; the first is the backend's
# (paged_decode's defaults)
TRITON_CONFIGS = ((2, 3), (2, 2), (2, 4), (1, 3), (4, 3))


def triton_call(case: dict, scale: float, num_warps: int, num_stages: int,
                splits: int | None = None):
    """``triton_ops.paged_decode`` (``decode_kernel: "triton"``) on the same
    pages, with the backend's split count unless ``splits`` is given."""
    import torch
    from vllm_sparsemm.kernels import triton_ops
    query = case["query"]
    if splits is None:
        splits = backend_triton_splits(case)
    out = torch.empty_like(query)

    def call():
        return triton_ops.paged_decode(query, case["pages"], case["table"],
                                       case["lengths"], scale, out,
                                       num_splits=splits, num_warps=num_warps,
                                       num_stages=num_stages)
    return call


def tritons_path_call(case: dict, scale: float):
    """The backend's Triton call with each launch through Triton's own
    launch path, not past it (``kernels/launch.py``): the same kernels, so
    only ``host_us`` differs, by what the direct launches save the host."""
    from vllm_sparsemm.kernels import triton_ops
    call = triton_call(case, scale, *TRITON_CONFIGS[0])
    launchers = (triton_ops._launch_decode, triton_ops._launch_decode_combine)

    def through_triton():
        chosen = [launcher._direct for launcher in launchers]
        for launcher in launchers:
            launcher._direct = False
        try:
            return call()
        finally:
            for launcher, direct in zip(launchers, chosen):
                launcher._direct = direct
    return through_triton


def time_call(call, iters: int, repeat: int = 10) -> float:
    """Median ms per call over ``iters`` samples, each ``repeat`` replays of
    a CUDA graph of the call between two events: as decode runs under full
    CUDA graphs, and the GPU never waits for Python to launch."""
    import torch
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
            enable_timing=True)
        start.record()
        for _ in range(repeat):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return statistics.median(times)


def host_time(call, calls: int = 200) -> float:
    """Microseconds of host time per eager call, the GPU left to catch up
    after: fewer launches than the device's queue holds, so none waits."""
    import time

    import torch
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def backend_triton_splits(case: dict) -> int:
    from vllm_sparsemm.engine import backend
    return backend.triton_decode_splits(case["lengths"].numel(),
                                        backend.sm_count(case["query"].device))


def run_case(case_spec: tuple[int, int, int, int], args) -> list[dict]:
    import torch
    rows, tokens, long_heads, long_tokens = case_spec
    case = build_case(rows, tokens, args.heads, args.dim, args.block_size,
                      torch.device("cuda"), group=args.group,
                      long_heads=long_heads, long_tokens=long_tokens)
    scale = args.dim**-0.5
    # a lopsided case has no stock twin (stock holds every head at the
    # longest): it is timed against the backend's FlashAttention call
    variants = {} if long_heads else {"stock": stock_call(case, scale)}
    variants |= {"per-head (backend)": per_head_call(case, scale),
                "per-head, FA's split heuristic": per_head_call(case, scale, "fa"),
                "per-head, K and V apart": per_head_call(case, scale,
                                                         separate_kv=True)}
    for warps, stages in TRITON_CONFIGS:
        name = f"per-head, Triton kernel, {warps} warps, {stages} stages"
        if (warps, stages) == TRITON_CONFIGS[0]:
            name += " (the backend's)"
        variants[name] = triton_call(case, scale, warps, stages)
    variants["per-head, Triton kernel, through Triton's launch path"] = (
        tritons_path_call(case, scale))
    if backend_triton_splits(case) > 1:  # what splitting each head buys
        warps, stages = TRITON_CONFIGS[0]
        variants[f"per-head, Triton kernel, {warps} warps, {stages} stages, "
                 "unsplit"] = triton_call(case, scale, warps, stages, splits=1)
    want = next(iter(variants.values()))().clone()
    results = []
    for name, call in variants.items():
        got = call()
        # fp16 inputs, fp32 softmax in both; outputs round to fp16 (~1e-3)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)
        ms = time_call(call, args.iters)
        results.append({"rows": rows, "tokens_per_head": tokens,
                        "long_heads": long_heads, "long_tokens": long_tokens,
                        "variant": name, "ms": round(ms, 4),
                        "host_us": round(host_time(call), 1),
                        "kv_gb_per_s": round(case["kv_bytes"] / ms / 1e6, 1)})
    base = results[0]["ms"]
    for r in results:
        r["x_first_time"] = round(r["ms"] / base, 3)  # stock, where it runs
    del case
    torch.cuda.empty_cache()
    return results


def parse_cases(text: str) -> list[tuple[int, int, int, int]]:
    """``"755x265,26x300+2x2000"`` -> [(755, 265, 0, 0), (26, 300, 2, 2000)]:
    ROWSxTOKENS, and optionally +NxLONG: N KV heads per row hold LONG."""
    cases = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)(?:\+(\d+)x(\d+))?", item.strip())
        if not match:
            raise SystemExit(f"--cases: {item!r} is not ROWSxTOKENS or "
                             "ROWSxTOKENS+NxLONG")
        cases.append(tuple(int(g or 0) for g in match.groups()))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases",
                        default="755x265,330x770,41x350,41x600,26x300+2x2000",
                        help="ROWSxTOKENS per KV head, or ROWSxTOKENS+NxLONG "
                        "(N of each row's KV heads hold LONG), comma separated "
                        "(defaults: LLaVA-1.5 on a whole H200, sparsemm then "
                        "stock; the 8 GiB NeXT case at B=64, mid-life and "
                        "late; at B=256, whose visual heads keep ~1,600 of "
                        "2,900 prompt tokens)")
    parser.add_argument("--heads", type=int, default=32, help="KV heads")
    parser.add_argument("--group", type=int, default=1,
                        help="query heads per KV head (Qwen2-VL-7B: 4 KV "
                        "heads, 7 each)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="attention_bench.json")
    args = parser.parse_args()
    cases = parse_cases(args.cases)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("attention_bench.py times GPU kernels: no CUDA device")
    results = []
    for case in cases:
        results += run_case(case, args)
    print("rows | tokens/head | variant | ms | KV GB/s | x first (stock, "
          "or the per-head FA call) | host us a launch")
    for r in results:
        long = (f" + {r['long_heads']}x{r['long_tokens']}" if r["long_heads"]
                else "")
        print(f"{r['rows']} | {r['tokens_per_head']}{long} | {r['variant']} | "
              f"{r['ms']:.3f} | {r['kv_gb_per_s']:.0f} | {r['x_first_time']:.2f} | "
              f"{r['host_us']:.0f}")
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "settings": vars(args),
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
