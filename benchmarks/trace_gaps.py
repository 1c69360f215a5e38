"""Where the GPU idles in a torch-profiler trace, and what the host was doing
then.

    python benchmarks/trace_gaps.py prompt_trace.sparsemm.json.gz [--json out.json]

Reads a Chrome trace written by ``benchmarks/benchmark.py --profile-trace``
(kineto's format), merges the GPU's kernels, copies and memsets into busy
intervals, and charges every idle gap inside the span to what the engine
thread (the thread with the most CPU-op time) had open at that instant: the
innermost torch op or CUDA runtime call, and the outermost scope (vLLM's
``gpu_model_runner: ...`` ranges with ``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1``,
or an attention layer's ``vllm::unified_attention_with_output``). Time with
nothing open is host Python outside torch (numpy, vLLM's bookkeeping,
sparsemm's plan). A step whose gaps sum small is GPU-bound: host work there
cannot buy time; then the GPU time per kernel name says where it goes.
``host_time_by_scope`` gives the engine thread's time inside each named scope
whether the GPU waited or not: a GPU-bound run's host cost, to hold against
another backend's; ``attention_calls`` the same for one eager attention
layer's call, with the part of it spent in Python. ``idle_by_next_gpu_op_ms``
charges each gap to the GPU work that ends it, what the host was getting ready
to launch: in a piecewise step, an attention kernel after a gap means the
host's attention path (Python, Triton's launcher) ran longer than the graph
piece before it.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "user_annotation", "cuda_runtime", "python_function",
             "cuda_driver"}
NO_OP = "(no torch op: host Python)"
ATTENTION = "vllm::unified_attention_with_output"
GAP_BUCKETS_US = (10, 100, 1000)
STEP = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def merge(intervals):
    """Union of ``(start, end)`` intervals, sorted."""
    merged = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def engine_thread(events) -> tuple:
    """The (pid, tid) with the most CPU-op time: the engine's own thread."""
    busy = defaultdict(float)
    for e in events:
        if e.get("cat") == "cpu_op":
            busy[(e["pid"], e["tid"])] += e["dur"]
    return max(busy, key=busy.get) if busy else None


def attention_calls(host) -> dict:
    """An attention layer's host cost per call on the engine thread
    (``host``: its ``(start, end, name)`` events sorted by start, outer
    first): duration, and the time inside it with no other event open, which
    is Python (the backend's own, a Triton launcher's) rather than torch or
    CUDA. Only eager calls appear: a replayed CUDA graph runs no layer."""
    durations, own = [], []
    for i, (lo, hi, name) in enumerate(host):
        if name != ATTENTION:
            continue
        covered, reach = 0.0, lo
        for c_lo, c_hi, _ in host[i + 1:]:
            if c_lo >= hi:
                break
            if c_hi > reach:  # the part of a child not yet counted
                covered += min(c_hi, hi) - max(c_lo, reach)
                reach = min(c_hi, hi)
        durations.append(hi - lo)
        own.append(hi - lo - covered)

    def quantile(values, q):
        ordered = sorted(values)
        return round(ordered[int(q * (len(ordered) - 1))] / 1e3, 3)

    if not durations:
        return {"calls": 0}
    return {"calls": len(durations),
            "median_ms": quantile(durations, 0.5),
            "p90_ms": quantile(durations, 0.9),
            "median_python_ms": quantile(own, 0.5)}


def steps(events, thread) -> dict:
    """Per kind of engine step (``prompt``: it runs prompt tokens;
    ``decode``: it does not), means over the steps of the trace: ms to the
    next step, ms of the step's host range, ms of GPU work it launched
    (matched by CUDA correlation id, so work that runs after the range
    ends still counts), ms in eager attention calls, and prompt tokens."""
    marks = sorted((e for e in events if e.get("cat") == "user_annotation"
                    and (e["pid"], e["tid"]) == thread
                    and STEP.match(e["name"])), key=lambda e: e["ts"])
    starts = [e["ts"] for e in marks]
    launched_at = {e["args"]["correlation"]: e["ts"] for e in events
                   if e.get("cat") in ("cuda_runtime", "cuda_driver")
                   and "correlation" in e.get("args", {})}

    def step_of(ts):
        return bisect.bisect_right(starts, ts) - 1

    gpu, attention = defaultdict(float), defaultdict(float)
    for e in events:
        if e.get("cat") in GPU_CATS:
            at = launched_at.get(e.get("args", {}).get("correlation"), e["ts"])
            gpu[step_of(at)] += e["dur"]
        elif (e.get("name") == ATTENTION and (e["pid"], e["tid"]) == thread):
            attention[step_of(e["ts"])] += e["dur"]
    kinds = defaultdict(list)
    for i, mark in enumerate(marks[:-1]):  # the last one has no next step
        tokens = int(STEP.match(mark["name"]).group(2))
        kinds["prompt" if tokens else "decode"].append(
            (marks[i + 1]["ts"] - mark["ts"], mark["dur"], gpu[i],
             attention[i], tokens))
    result = {}
    for name, rows in sorted(kinds.items()):
        n = len(rows)
        wall, host, on_gpu, attn, tokens = (sum(col) for col in zip(*rows))
        result[name] = {"steps": n, "wall_ms": round(wall / n / 1e3, 3),
                        "host_ms": round(host / n / 1e3, 3),
                        "gpu_ms": round(on_gpu / n / 1e3, 3),
                        "attention_ms": round(attn / n / 1e3, 3),
                        "prompt_tokens": round(tokens / n, 1)}
    return result


def analyse(events, top: int = 15) -> dict:
    gpu = merge((e["ts"], e["ts"] + e["dur"]) for e in events
                if e.get("cat") in GPU_CATS)
    if not gpu:
        raise ValueError("no GPU events in the trace")
    start, end = gpu[0][0], gpu[-1][1]
    gaps = [(a[1], b[0]) for a, b in zip(gpu, gpu[1:])]
    launched = sorted((e["ts"], e["name"]) for e in events
                      if e.get("cat") in GPU_CATS)
    starts = [ts for ts, _ in launched]
    thread = engine_thread(events)
    scope_names = {e["name"] for e in events
                   if e.get("cat") == "user_annotation"
                   and (e["pid"], e["tid"]) == thread}
    host = sorted(((e["ts"], e["ts"] + e["dur"], e["name"])
                   for e in events if e.get("cat") in HOST_CATS
                   and (e["pid"], e["tid"]) == thread),
                  key=lambda h: (h[0], -h[1]))
    innermost, scope = defaultdict(float), defaultdict(float)
    next_op = defaultdict(float)
    largest, open_, taken = [], [], 0
    for lo, hi in gaps:  # in time order: sweep the host events once
        while taken < len(host) and host[taken][0] < hi:
            open_.append(host[taken])
            taken += 1
        open_ = [h for h in open_ if h[1] > lo]  # open at some point of the gap
        cuts = sorted({lo, hi, *(t for h in open_ for t in h[:2]
                                 if lo < t < hi)})
        names = defaultdict(float)
        for a, b in zip(cuts, cuts[1:]):
            inside = [h for h in open_ if h[0] <= a and h[1] >= b]
            inner = max(inside, key=lambda h: (h[0], -h[1]), default=None)
            outer = min(inside, key=lambda h: (h[0], -h[1]), default=None)
            names[inner[2] if inner else NO_OP] += b - a
            scope[outer[2] if outer else NO_OP] += b - a
        for name, t in names.items():
            innermost[name] += t
        # the first GPU op to start as the gap ends (a merged busy interval
        # starts with its earliest op)
        next_op[launched[bisect.bisect_left(starts, hi)][1]] += hi - lo
        largest.append((hi - lo, lo - start, max(names, key=names.get)))
    idle = sum(hi - lo for lo, hi in gaps)
    buckets = {}
    for i, limit in enumerate(GAP_BUCKETS_US + (float("inf"),)):
        low = GAP_BUCKETS_US[i - 1] if i else 0
        chosen = [hi - lo for lo, hi in gaps if low <= hi - lo < limit]
        label = f"{low}-{limit} us" if limit != float("inf") else f">{low} us"
        buckets[label] = {"count": len(chosen), "ms": round(sum(chosen) / 1e3, 3)}

    kernel_time, kernel_calls = defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("cat") in GPU_CATS:
            kernel_time[e["name"]] += e["dur"]
            kernel_calls[e["name"]] += 1

    # the engine thread's time in each named scope, nested ones of one name
    # counted once, and how often it opened
    spans, opened = defaultdict(list), defaultdict(int)
    for lo, hi, name in host:
        if name in scope_names:
            spans[name].append((lo, hi))
            opened[name] += 1
    in_scope = {name: sum(hi - lo for lo, hi in merge(intervals))
                for name, intervals in spans.items()}

    def ranked(table):
        return [[name, round(t / 1e3, 3)] for name, t in
                sorted(table.items(), key=lambda kv: -kv[1])[:top]]

    def ranked_with_counts(times, counts):
        return [[name[:160], ms, counts[name]]
                for name, ms in ranked(times)]

    return {"span_ms": round((end - start) / 1e3, 3),
            "gpu_busy_ms": round(sum(hi - lo for lo, hi in gpu) / 1e3, 3),
            "gpu_idle_ms": round(idle / 1e3, 3),
            "gpu_busy_fraction": round(1 - idle / (end - start), 4),
            "gaps": buckets,
            "idle_by_innermost_host_op_ms": ranked(innermost),
            "idle_by_outermost_host_scope_ms": ranked(scope),
            "idle_by_next_gpu_op_ms": ranked(next_op),
            "host_time_by_scope": ranked_with_counts(in_scope, opened),
            "attention_calls": attention_calls(host),
            "steps": steps(events, thread),
            "gpu_time_by_kernel": ranked_with_counts(kernel_time,
                                                     kernel_calls),
            "largest_gaps": [[round(d / 1e3, 3), round(at / 1e3, 3), name]
                             for d, at, name in sorted(largest)[::-1][:10]]}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", help="Chrome traces (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {}
    for path in args.traces:
        results[path] = result = analyse(load(path), args.top)
        print(f"== {path}: span {result['span_ms']} ms, GPU busy "
              f"{result['gpu_busy_fraction']:.1%}, idle {result['gpu_idle_ms']} ms")
        print("   gaps by size:", result["gaps"])
        for key in ("idle_by_outermost_host_scope_ms",
                    "idle_by_innermost_host_op_ms", "idle_by_next_gpu_op_ms"):
            print(f"   {key}:")
            for name, ms in result[key]:
                print(f"     {ms:9.3f}  {name[:100]}")
        for key, what in (("host_time_by_scope", "opened"),
                          ("gpu_time_by_kernel", "calls")):
            print(f"   {key}_ms ({what}):")
            for name, ms, calls in result[key]:
                print(f"     {ms:9.3f}  ({calls})  {name[:100]}")
        print("   attention layer calls (eager):", result["attention_calls"])
        for kind, figures in result["steps"].items():
            print(f"   {kind} steps (ms each):", figures)
        print("   largest gaps [ms, at ms, host op]:", result["largest_gaps"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
