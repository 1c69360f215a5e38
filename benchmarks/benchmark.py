"""Stock vLLM (FLASH_ATTN) against sparsemm, back to back, on dummy-weight 7B models.

    python benchmarks/benchmark.py --model llava-next-7b --budget 256,64 \\
        --num-requests 512 --output-len 512 --max-seconds 150 --out bench.json
    python benchmarks/benchmark.py --model llava-1.5-7b --latency --contexts 2048,32768

Throughput mode adds every request at once (each with its own random image) and
steps the engine. Output throughput is reported three ways:

* run tok/s (``run_output_tok_per_s``, the headline): every output token over
  the seconds the run lasted, finished or cut at ``--max-seconds``. It
  includes ramp-up and, if the run finished, the tail, so for a backend that
  finishes earlier it is conservative; it is always comparable.
* saturated tok/s (``saturated_output_tok_per_s``): over the window from the
  first finished request to the last first token, where the engine both
  admits and decodes at capacity (the steady state a server under load sees).
  Null, with ``saturated_note``, when that window is under 20% of the run:
  peak concurrency then nears the number of requests and there is no steady
  state to measure.
* e2e tok/s (``output_tok_per_s``): requests x output length over the run,
  only when it finished.

Also time to first token (from submission, so it includes queueing), decode
ms/token, peak requests decoding at once, recompute preemptions, KV blocks per
running request (from the block pool), for sparsemm the blocks each
compressed request holds against the exact ideal ``sum over heads of
ceil(kept / block_size) / (L * Hkv)``, and a ``timeline`` of [seconds, output
tokens so far, requests decoding, requests finished] about once a second from
which any other window can be recomputed.
``host_ms_per_step`` splits the median decode step and the median step with
prompt tokens into vLLM's scheduler, input preparation and launch, output
handling and the wait for the GPU (a step that waits is GPU-bound); on vLLM's
V1 model runner (sparsemm's) the launch part is split again into the state
update, input preparation, attention metadata, preprocessing (the vision
tower runs there) and the model call, with the attention backend's own
Python (``attention_forward``) and the median rows per step. With
``--profile-at`` the torch profiler's tables land in the JSON (of
``--profile-steps`` steps, or with ``--profile-prompt-step`` of the first
step from there that schedules prompt tokens), and ``--profile-trace``
writes the timeline too (``benchmarks/trace_gaps.py`` says what the host was
doing while the GPU idled in it). ``host_cpu`` gives the CPU
seconds of the engine's thread and of all other threads of the process over
the run (spinning intra-op workers show there), the thread counts in effect,
and a fixed pure-Python workload's time, to compare host speed across
machines; ``host_probe_ratio`` is each run's workload time over stock's, and
a note is printed beside the ratios where it is off by more than 1.5x.

Latency mode sends one request of fresh random token ids at a time (so stock's
prefix cache never hits): time to first token and batch-1 decode ms/token per
context length, medians of ``--latency-repeats`` requests of each kind.

Each backend (and each budget of a comma list) runs in a fresh process on the
same GPU; ``--baseline`` reuses a stock result measured earlier on the same
machine. A table is printed and JSON written (with the GPU's name); every
worker's log goes to ``<out>.log``. Model folders are written locally.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

MODELS = {
    "llava-1.5-7b": ("write_dummy_llava_15_7b", (672, 448)),
    "llava-next-7b": ("write_dummy_llava_next_7b", (672, 672)),
    "qwen2-vl-7b": ("write_dummy_qwen2_vl_7b", (1344, 1008)),
}
# after "sparsemm:": decode steps in full CUDA graphs (the default), piecewise,
# or full graphs with the decode kernel named (config.DECODE_KERNELS, in
# upper case)
KERNEL_MODES = ("TRITON", "FLASH_ATTN")
SPARSEMM_MODES = ("", "FULL", "PIECEWISE") + KERNEL_MODES


def _prompt(model: str, text: str, with_image: bool) -> str:
    if model.startswith("qwen"):
        vision = "<|vision_start|><|image_pad|><|vision_end|>" if with_image else ""
        return (f"<|im_start|>user\n{vision}{text}<|im_end|>\n"
                f"<|im_start|>assistant\n")
    return f"USER: {'<image>' if with_image else ''}\n{text} ASSISTANT:"


def _image(seed: int, size):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(
        np.uint8))


def _engine(args, backend):
    from vllm import LLM
    kwargs = {"model": args.model_dir, "load_format": "dummy", "seed": 0,
              "max_model_len": args.max_model_len,
              "gpu_memory_utilization": args.gpu_memory_utilization,
              "limit_mm_per_prompt": {"image": 1},
              "max_num_seqs": args.max_num_seqs, "disable_log_stats": True}
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 2**30)
    if args.max_model_len > 4096 and not args.model.startswith("qwen"):
        kwargs["hf_overrides"] = {"text_config": {
            "max_position_embeddings": args.max_model_len}}
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    compilation = {}
    if args.max_cudagraph_capture_size:
        compilation["max_cudagraph_capture_size"] = (
            args.max_cudagraph_capture_size)
    if backend.startswith("sparsemm"):
        # Environment rather than --additional-config: the latter enters
        # vLLM's compile-cache hash, so each budget would recompile the model.
        os.environ["VLLM_SPARSEMM_BUDGET"] = str(args.budget)
        # decode steps replay full CUDA graphs (the default) or run
        # piecewise (sparsemm:PIECEWISE, setting full_cuda_graphs off);
        # sparsemm:TRITON and sparsemm:FLASH_ATTN are full graphs with that
        # decode_kernel named, whatever the default
        mode = backend.partition(":")[2] or "FULL"
        os.environ["VLLM_SPARSEMM_FULL_CUDA_GRAPHS"] = str(int(mode != "PIECEWISE"))
        if mode in KERNEL_MODES:
            os.environ["VLLM_SPARSEMM_DECODE_KERNEL"] = mode.lower()
        if args.head_scores:
            os.environ["VLLM_SPARSEMM_HEAD_SCORES"] = args.head_scores
        kwargs["attention_backend"] = "sparsemm"
    else:  # e.g. FLASH_ATTN, or FLASH_ATTN:PIECEWISE for its CUDA-graph mode
        name, _, mode = backend.partition(":")
        kwargs["attention_backend"] = name
        if mode == "V1":
            # stock on vLLM's V1 model runner, the one sparsemm runs on
            # (stock LLaVA defaults to V2): what the runner alone costs
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        elif mode:
            compilation["cudagraph_mode"] = mode
    if compilation:
        kwargs["compilation_config"] = compilation
    return LLM(**kwargs)


def run_throughput(args, backend) -> dict:
    """Every request submitted at once, the engine stepped until the end or the
    time cap. Each step's (seconds, output tokens so far, requests decoding,
    requests finished) is kept, so the run, saturated and timeline figures
    all come from the same clock."""
    from vllm import SamplingParams
    llm = _engine(args, backend)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0, max_tokens=args.output_len,
                            ignore_eos=True)
    size = MODELS[args.model][1]
    for i in range(args.num_requests):
        engine.add_request(str(i), {
            "prompt": _prompt(args.model, f"Describe picture {i}.", True),
            "multi_modal_data": {"image": _image(i, size)}}, params)
    preemptions = [0]
    preempt = scheduler._preempt_request

    def counting_preempt(request, timestamp):  # vLLM's recompute preemption
        preemptions[0] += 1
        return preempt(request, timestamp)

    scheduler._preempt_request = counting_preempt
    import torch
    core = engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    clock = HostClock(core, runner, torch.cuda.Event,
                      _attention_impl_class(runner.vllm_config))
    seen, first, done, log = {}, {}, {}, []
    peak, held, steps, tokens, per_request = 0, [], 0, 0, []
    peak_scheduled = 0
    pool = scheduler.kv_cache_manager.block_pool
    window = ProfileWindow(args, backend, lambda: (
        pool.num_gpu_blocks - pool.get_num_free_blocks()))
    threads = ThreadCPU()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        start += window.before_step(steps, clock.steps)
        step_start = time.perf_counter()
        outs = engine.step()
        clock.end_step(time.perf_counter() - step_start)
        # profiled steps are left out: the clock and the token count stand still
        now = (window.paused_at if window.active else time.perf_counter()) - start
        for out in outs:
            count = len(out.outputs[0].token_ids)
            if not window.active:
                tokens += count - seen.get(out.request_id, 0)
            seen[out.request_id] = count
            if count and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = now
        steps += 1
        running = len(first) - len(done)  # decoding: first token out, not done
        peak = max(peak, running)
        peak_scheduled = max(peak_scheduled, len(scheduler.running))
        log.append((now, tokens, running, len(done)))
        if steps % 64 == 0:  # sampled: the probe itself costs host time
            per_request.append(_mean_blocks_held(scheduler))
            if backend.startswith("sparsemm"):
                held += _held_vs_ideal(scheduler)[:64]
        if now > args.max_seconds and done:  # the saturated window has begun
            break
    clock.close()
    host_cpu = threads.summary()
    elapsed = now
    finished = len(done) == args.num_requests
    ttft = sorted(first.values())
    tpot = [(done[r] - first[r]) * 1000 / (args.output_len - 1)
            for r in done if args.output_len > 1]
    result = {
        "backend": backend, "requests": args.num_requests,
        "finished_requests": len(done), "steps": steps, "seconds": elapsed,
        "run_output_tok_per_s": tokens / elapsed,
        "output_tok_per_s": (args.num_requests * args.output_len / elapsed
                             if finished else None),
        "requests_per_s": args.num_requests / elapsed if finished else None,
        **saturated_window(list(first.values()), list(done.values()),
                           args.num_requests, log, elapsed),
        "ttft_mean_s": sum(ttft) / len(ttft),
        "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))],
        "decode_ms_per_token_mean": sum(tpot) / len(tpot) if tpot else None,
        "peak_concurrent_requests": peak,  # decoding at once
        "peak_scheduler_running": peak_scheduled,  # incl. partial prefills
        "preemptions": preemptions[0],
        "kv_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
        "kv_blocks_per_running_request": (
            sum(per_request) / len(per_request) if per_request else None),
        "timeline": timeline(log, elapsed),
        "host_ms_per_step": clock.summary(),
        "host_cpu": host_cpu,
        "max_cudagraph_capture_size": (
            engine.vllm_config.compilation_config.max_cudagraph_capture_size),
    }
    if held:
        result["blocks_held_over_ideal_mean"] = sum(h for h, _ in held) / sum(
            i for _, i in held)
        result["blocks_held_over_ideal_max"] = max(h / i for h, i in held)
        # the performance goal: within 2% of the ideal plus at most one block
        result["blocks_held_within_goal"] = sum(
            h <= 1.02 * i + 1 for h, i in held) / len(held)
    if window.profiled:
        result["profile"], result["profiled_gpu_busy_fraction"] = window.profiled
        result["profiled_steps"] = window.what
    return result


class ThreadCPU:
    """CPU seconds this process's threads spent over the run (Linux /proc):
    the engine's own thread against all others (torch's intra-op workers
    spin after each parallel CPU op and compete with a host-bound step for
    cores), with the thread counts in effect and a fixed pure-Python
    workload timed at the start, to compare host speed across machines."""

    def __init__(self):
        import threading
        self.main = threading.get_native_id()
        self.probe_ms = _python_probe_ms()
        self.wall = time.perf_counter()
        self.start = self._ticks()

    @staticmethod
    def _ticks() -> dict[int, tuple[str, int]]:
        ticks = {}
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/stat") as f:
                    name, rest = f.read().split(" (", 1)[1].rsplit(") ", 1)
                fields = rest.split()
                ticks[int(tid)] = (name, int(fields[11]) + int(fields[12]))
        except OSError:
            pass
        return ticks

    def summary(self) -> dict:
        import torch
        end, hz = self._ticks(), os.sysconf("SC_CLK_TCK")
        spent = {tid: (name, (t - self.start.get(tid, (name, 0))[1]) / hz)
                 for tid, (name, t) in end.items()}
        others = sorted((s, name) for tid, (name, s) in spent.items()
                        if tid != self.main)
        return {
            "wall_s": round(time.perf_counter() - self.wall, 3),
            "main_thread_cpu_s": spent.get(self.main, ("", 0.0))[1],
            "other_threads_cpu_s": round(sum(s for s, _ in others), 2),
            "busiest_other_threads": [[n, s] for s, n in others[::-1][:4]],
            "torch_threads": torch.get_num_threads(),
            "cpus_allowed": len(os.sched_getaffinity(0)),
            "python_probe_ms": self.probe_ms,
        }


# Host-bound runs move with the host: a ratio to stock means little when one
# process probed this much slower than the other.
HOST_PROBE_TOLERANCE = 1.5


def host_probe_ratio(result: dict, base: dict) -> float | None:
    """How much slower (>1) the host ran ``result``'s process than ``base``'s,
    by ``_python_probe_ms``; None where either lacks the probe."""
    ours = (result.get("host_cpu") or {}).get("python_probe_ms")
    theirs = (base.get("host_cpu") or {}).get("python_probe_ms")
    return ours / theirs if ours and theirs else None


def _python_probe_ms() -> float:
    """A fixed pure-Python workload (dict and list work like a scheduler's),
    best of three."""
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        table = {str(i): i for i in range(20000)}
        total = sum(table[str(i)] for i in range(0, 20000, 2))
        rows = sorted(((i * 7919) % 20000, i) for i in range(20000))
        best = min(best, time.perf_counter() - t0)
    assert total and rows
    return round(best * 1e3, 3)


class HostClock:
    """Host time per engine step, by part: vLLM's scheduler, the model
    runner's input preparation and launch (``execute_model``), output
    handling, and the time spent waiting for the GPU (CUDA event syncs). A
    step whose wait is near zero is host-bound: the GPU idled for the host.

    Inside ``execute_model``, where the V1 runner has them (sparsemm's
    runner; stock LLaVA runs V2): its state update, input preparation,
    attention metadata (sparsemm's step plan is part of it), input
    preprocessing and the model call (``model_forward``: the launches, or
    a graph replay). ``attention_forward`` sums the attention layers' own
    Python (the backend's ``forward``, part of ``model_forward``): it runs
    only where a step is not one full graph, so it splits an eager or
    piecewise step's model call into the backend's share and the rest."""

    PARTS = (("scheduler", "schedule", "schedule"),
             ("scheduler", "update_from_output", "update_from_output"),
             ("model_executor", "execute_model", "execute_model"),
             ("model_executor", "sample_tokens", "sample_tokens"))
    RUNNER_PARTS = (("_update_states", "update_states"),
                    ("_prepare_inputs", "prepare_inputs"),
                    ("_build_attention_metadata", "attention_metadata"),
                    ("_preprocess", "preprocess"),
                    ("_model_forward", "model_forward"))

    def __init__(self, core, runner, event_cls, attention_impl=None,
                 clock=time.perf_counter):
        self.clock = clock  # tests pass a counter: no wall-clock asserts
        self.current, self.steps, self.wrapped = {}, [], []
        for owner, name, label in self.PARTS:
            self._wrap(getattr(core, owner), name, label)
        for name, label in self.RUNNER_PARTS:  # V1 runner only
            if hasattr(runner, name):
                self._wrap(runner, name, label)
        if attention_impl is not None:  # the class: every layer's calls
            self._wrap(attention_impl, "forward", "attention_forward")
        self._wrap(event_cls, "synchronize", "gpu_wait")

    def _wrap(self, owner, name, label):
        original = getattr(owner, name)
        self.wrapped.append((owner, name, owner.__dict__.get(name)))

        def timed(*args, **kwargs):
            start = self.clock()
            try:
                result = original(*args, **kwargs)
            finally:
                self.current[label] = (self.current.get(label, 0.0) +
                                       self.clock() - start)
            if label == "schedule":  # a uniform decode step, or one with prompts
                rows = len(result.num_scheduled_tokens)
                self.current.update(
                    decode=result.total_num_scheduled_tokens == rows,
                    rows=rows, tokens=result.total_num_scheduled_tokens)
            return result

        setattr(owner, name, timed)

    def close(self) -> None:
        """Put back what was wrapped (a class attribute, or the instance's own)."""
        for owner, name, own in reversed(self.wrapped):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)

    def end_step(self, seconds: float) -> None:
        self.current["step"] = seconds
        self.steps.append(self.current)
        self.current = {}

    def summary(self) -> dict:
        """Median ms per step of each part over the middle 80% of the steps
        (ramp-up and tail left out), for steps that scheduled only decode
        tokens and for those with prompt tokens (``mixed``), with counts and
        the 10th and 90th percentiles of the step (a host slowed throughout
        moves all three; stalls, e.g. CPU-quota throttling, widen them)."""
        n = len(self.steps)
        middle = self.steps[n // 10:n - n // 10] or self.steps
        labels = (["step", "gpu_wait"] + [p[2] for p in self.PARTS] +
                  [p[1] for p in self.RUNNER_PARTS] + ["attention_forward"])
        summary = {}
        for kind, steps in (("decode", [s for s in middle if s.get("decode")]),
                            ("mixed", [s for s in middle
                                       if s.get("decode") is False])):
            summary[kind] = {"steps": len(steps), **({
                label: round(1000 * statistics.median(
                    s.get(label, 0.0) for s in steps), 3)
                for label in labels} if steps else {}),
                **({"rows": statistics.median(s["rows"] for s in steps)}
                   if steps else {}),
                **(_deciles(1000 * st["step"] for st in steps) if len(steps) > 1
                   else {})}
        return summary


def _attention_impl_class(vllm_config):
    """The impl class most of this engine's attention layers share (the
    language model's backend), for HostClock; None if none is registered."""
    from collections import Counter
    layers = vllm_config.compilation_config.static_forward_context.values()
    kinds = Counter(type(layer.impl) for layer in layers
                    if hasattr(layer, "impl"))
    return kinds.most_common(1)[0][0] if kinds else None


def _deciles(values) -> dict:
    cuts = statistics.quantiles(values, n=10)
    return {"step_p10": round(cuts[0], 3), "step_p90": round(cuts[-1], 3)}


def saturated_window(first_token_times, finish_times, num_requests, log,
                     run_seconds, min_share=0.2) -> dict:
    """Throughput from the first finished request to the last first token (the
    run's end if a request still waits): there the engine both admits and
    decodes at capacity. Before it is ramp-up, after it the tail. When peak
    concurrency nears the request count every request is admitted about as
    soon as the first finishes, so a window under min_share of the run
    measures no steady state and reports null with a note. log holds each
    step's (seconds, output tokens so far, requests decoding, ...); the
    caller guarantees a finished request."""
    start = min(finish_times)
    end = (max(first_token_times) if len(first_token_times) == num_requests
           else run_seconds)
    window = max(end - start, 0.0)
    inside = [row for row in log if start < row[0] <= end]
    result = {"saturated_window_s": window,
              "saturated_mean_running": (sum(row[2] for row in inside) /
                                         len(inside) if inside else None)}
    if not window or window < min_share * run_seconds:
        result["saturated_output_tok_per_s"] = None
        admitted = (f"admission went on {window:.2f} s past the first finish, "
                    f"under {min_share:.0%} of the run" if window else
                    "every request got its first token before the first "
                    "finished")
        result["saturated_note"] = (
            f"workload too small to saturate: {admitted} (window {window:.2f} "
            f"s of {run_seconds:.2f} s)")
        return result

    def tokens_at(t):
        return max((row[1] for row in log if row[0] <= t), default=0)

    result["saturated_output_tok_per_s"] = (tokens_at(end) -
                                            tokens_at(start)) / window
    return result


def timeline(log, run_seconds, points=300) -> list:
    """[seconds, output tokens so far, requests decoding, requests finished]
    from the step log about once a second (every ceil(run / points) seconds
    on long runs, to stay small), always ending with the last step."""
    every = max(1, math.ceil(run_seconds / points))
    series, next_at = [], every
    for i, (t, *rest) in enumerate(log):
        if t >= next_at or i == len(log) - 1:
            series.append([round(t, 3), *rest])
            next_at = (t // every + 1) * every
    return series


class ProfileWindow:
    """Which engine steps the torch profiler records: ``--profile-steps``
    steps from ``--profile-at`` on or, with ``--profile-prompt-step``, the
    first single step from there that scheduled prompt tokens (a decode step
    recorded on the way is thrown away; at most ``ATTEMPTS`` tries). While it
    records, the run's clock and token count stand still."""

    ATTEMPTS = 64

    def __init__(self, args, backend: str, blocks_in_use=lambda: None):
        self.at, self.prompt = args.profile_at, args.profile_prompt_step
        self.length = 1 if self.prompt else args.profile_steps
        label = (f"{backend}-b{args.budget}" if backend.startswith("sparsemm")
                 else backend)
        self.trace = (_per_backend(args.profile_trace, label)
                      if args.profile_trace else None)
        self.blocks_in_use, self.what = blocks_in_use, None
        self.profiler, self.profiled = None, None
        self.started, self.attempts, self.paused_at = 0, 0, 0.0

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def before_step(self, step: int, clock_steps: list) -> float:
        """Close or open the window before engine step ``step``; returns the
        seconds a window that closed now kept the clock stopped."""
        paused = 0.0
        if self.active and step == self.started + self.length:
            if self.prompt and clock_steps[-1].get("decode", True):
                _end_profiler(self.profiler)
            else:
                self.profiled = _stop_profiler(self.profiler, self.trace)
                recorded = clock_steps[self.started - step:]
                self.what = {  # what the trace shows, to read it against
                    "first_step": self.started,
                    "blocks_in_use": self.blocks_in_use(),
                    "rows": [s.get("rows") for s in recorded],
                    "scheduled_tokens": [s.get("tokens") for s in recorded]}
            self.profiler = None
            paused = time.perf_counter() - self.paused_at
        if (not self.active and self.at and self.profiled is None
                and (step == self.at or self.prompt and step > self.at)
                and self.attempts < self.ATTEMPTS):
            self.paused_at = time.perf_counter()  # the profiler's setup too
            self.profiler = _start_profiler()
            self.started, self.attempts = step, self.attempts + 1
        return paused


def _per_backend(path: str, label: str) -> str:
    """``trace.json`` -> ``trace.sparsemm-b128.json``: one file per run."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.{label.replace(':', '-')}{ext}"


def _end_profiler(profiler) -> None:
    """End a recording once the GPU has caught up with it."""
    import torch
    torch.cuda.synchronize()
    profiler.__exit__(None, None, None)


def _start_profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    profiler.__enter__()
    return profiler


def _stop_profiler(profiler, trace: str | None = None) -> tuple[str, float]:
    """The top CUDA kernels and host ops of the profiled engine steps, and the
    GPU's busy fraction over them; with ``trace``, also the whole timeline
    as a gzipped Chrome trace (chrome://tracing, Perfetto)."""
    import gzip
    import shutil

    _end_profiler(profiler)
    if trace:
        profiler.export_chrome_trace(trace)
        with open(trace, "rb") as raw, gzip.open(trace + ".gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        os.remove(trace)
    averages = profiler.key_averages()
    tables = "\n".join(averages.table(sort_by=key, row_limit=30,
                                      max_name_column_width=80)
                       for key in ("cuda_time_total", "cpu_time_total"))
    return tables, _gpu_busy_fraction(profiler)


def _gpu_busy_fraction(profiler) -> float:
    """Union of GPU kernel intervals over the span from the first kernel to the
    last: the share of time a faster host (or full CUDA graphs) could not win."""
    from torch.autograd import DeviceType

    from trace_gaps import merge  # benchmarks/ is this script's sys.path[0]
    busy = merge((e.time_range.start, e.time_range.end)
                 for e in profiler.events() if e.device_type == DeviceType.CUDA)
    if not busy:
        return float("nan")
    return sum(hi - lo for lo, hi in busy) / (busy[-1][1] - busy[0][0])


def _mean_blocks_held(scheduler) -> float:
    """Blocks the pool has given each running request, on average (all backends)."""
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    held = [sum(not b.is_null for b in manager.req_to_blocks[r.request_id])
            for r in scheduler.running]
    return sum(held) / max(len(held), 1)


def _held_vs_ideal(scheduler):
    """(blocks held, exact ideal in blocks) for each decoding compressed request."""
    from vllm_sparsemm.core.pages import cdiv
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    law = manager.law
    pages_per_block = law.caps.numel()
    samples = []
    for request in scheduler.running:
        rid, prompt = request.request_id, request.num_prompt_tokens
        processed = request.num_computed_tokens - request.num_in_flight_tokens
        if not law.compresses(prompt) or processed <= prompt:
            continue
        blocks = manager.req_to_blocks[rid]
        if not manager.prompt_released(rid):
            continue  # its prompt goes back at a later schedule()
        # the blocks cover every scheduled token, the step in flight included
        appended = request.num_computed_tokens - prompt
        ideal = int(cdiv(law.kept(prompt) + appended, law.block_size).sum())
        samples.append((sum(not b.is_null for b in blocks),
                        ideal / pages_per_block))
    return samples


def run_latency(args, backend) -> dict:
    """One request at a time, each of fresh random token ids. Stock vLLM keeps
    prefix caching on (so does sparsemm), so a prompt repeated, or sharing
    its first block with an earlier one, would time a cache hit, not a prefill."""
    import numpy as np
    from vllm import SamplingParams
    llm = _engine(args, backend)
    tokenizer = llm.get_tokenizer()  # no special ids: <image> needs an image
    ordinary = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)
    rng = np.random.default_rng(0)  # the same prompts for every backend
    results = []
    for context in args.contexts:
        def timed(max_tokens):
            prompt = {"prompt_token_ids":
                      rng.choice(ordinary, context - 16).tolist()}
            start = time.perf_counter()
            llm.generate(prompt, SamplingParams(max_tokens=max_tokens,
                                                ignore_eos=True),
                         use_tqdm=False)
            return time.perf_counter() - start

        timed(8)  # warm-up at this length
        ttfts = [timed(1) for _ in range(args.latency_repeats)]
        totals = [timed(args.output_len + 1)
                  for _ in range(args.latency_repeats)]
        results.append({"context": context - 16,
                        **latency_figures(ttfts, totals, args.output_len)})
    return {"backend": backend, "latency": results}


def latency_figures(ttfts: list[float], totals: list[float],
                    output_len: int) -> dict:
    """Medians over repeats (one 64-token batch-1 run swung by 2 ms/token):
    TTFT from 1-token requests, decode from requests of ``output_len + 1``
    tokens less that TTFT."""
    ttft, total = statistics.median(ttfts), statistics.median(totals)
    return {"ttft_s": ttft,
            "decode_ms_per_token": (total - ttft) * 1000 / output_len,
            "repeats": len(ttfts), "ttft_spread_s": max(ttfts) - min(ttfts),
            "total_spread_s": max(totals) - min(totals)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, checked, with the defaults that depend on it filled in."""
    parser = argparse.ArgumentParser(  # the docstring says what each tok/s means
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llava-next-7b")
    parser.add_argument("--budget", default="256",
                        help="sparsemm budget; a comma list runs one sparsemm "
                        "process per budget against one stock run")
    parser.add_argument("--head-scores", default=None,
                        help="sparsemm score file (default: the Vicuna-7B file "
                        "for LLaVA models, 'uniform' for Qwen2-VL, which has "
                        "no shipped file yet)")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="vLLM's per-step token budget, for every backend "
                        "(default: vLLM's, 16384 offline). Smaller chunks "
                        "split prompts over more steps, and decoding rows "
                        "ride along in each; must be >= --max-num-seqs")
    parser.add_argument("--max-cudagraph-capture-size", type=int, default=0,
                        help="largest decode batch captured as CUDA graphs, "
                        "for every backend (default: vLLM's, min(2 x "
                        "max_num_seqs, 512)); rows past it decode without "
                        "graphs")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="fix the KV cache size (e.g. 8 for an L4-class GPU)")
    parser.add_argument("--max-seconds", type=float, default=1e9,
                        help="stop a throughput run this long after its start, "
                        "once a request has finished; run tok/s then covers "
                        "the seconds run, saturated tok/s the window up to the "
                        "stop, and e2e tok/s is not reported")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--latency-repeats", type=int, default=5,
                        help="latency mode: requests timed per context and "
                        "kind (medians are reported)")
    parser.add_argument("--backends", default="FLASH_ATTN,sparsemm",
                        help="comma list, first is the reference: FLASH_ATTN "
                        "(FLASH_ATTN:PIECEWISE for piecewise graphs only, "
                        "FLASH_ATTN:V1 on vLLM's V1 model runner), "
                        "sparsemm (full CUDA graphs for decode, the default), "
                        "sparsemm:PIECEWISE (setting full_cuda_graphs off), "
                        "sparsemm:TRITON / sparsemm:FLASH_ATTN (that "
                        "decode_kernel, whatever the default)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--baseline", default=None,
                        help="JSON of an earlier run of this script on the same "
                        "machine whose first result (stock) is the reference; "
                        "only the sparsemm runs are made")
    parser.add_argument("--profile-at", type=int, default=0,
                        help="profile engine steps from this step on (torch "
                        "profiler tables land in the JSON)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-prompt-step", action="store_true",
                        help="profile one step instead: the first from "
                        "--profile-at on that schedules prompt tokens")
    parser.add_argument("--profile-trace", default=None,
                        help="also write the profiled steps' timeline here "
                        "(a Chrome trace, gzipped to <path>.gz, the backend "
                        "put before the extension: one file per run)")
    parser.add_argument("--out", default="benchmark.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    for backend in args.backends.split(","):
        name, _, mode = backend.partition(":")
        if name == "sparsemm" and mode not in SPARSEMM_MODES:
            known = ", ".join(f"sparsemm:{m}" if m else "sparsemm"
                              for m in SPARSEMM_MODES)
            parser.error(f"unknown sparsemm mode {mode!r} in {backend!r}: use "
                         f"one of {known}")
    if (args.max_num_batched_tokens
            and args.max_num_batched_tokens < args.max_num_seqs):
        parser.error("vLLM needs --max-num-batched-tokens >= --max-num-seqs "
                     f"({args.max_num_batched_tokens} < {args.max_num_seqs})")
    if args.head_scores is None:
        args.head_scores = ("uniform" if args.model.startswith("qwen") else
                            "llava-v1.6-vicuna-7b")
    if args.latency:
        args.max_model_len = max(args.max_model_len, max(args.contexts) + 1024)
    return args


def main() -> int:
    args = parse_args(sys.argv[1:])
    import torch
    if not torch.cuda.is_available():
        print("benchmark.py: it measures vLLM on an NVIDIA GPU (CUDA); none is "
              "visible here", file=sys.stderr)
        return 2
    if args.worker:  # one backend, in this process
        args.budget = int(args.budget.split(",")[0])
        args.model_dir = os.environ["SPARSEMM_BENCH_DIR"]
        run = run_latency if args.latency else run_throughput
        result = run(args, args.worker)
        if args.worker.startswith("sparsemm"):  # every setting in effect (env included)
            import dataclasses

            from vllm_sparsemm.engine.config import SparseMMSettings
            result["sparsemm_settings"] = dataclasses.asdict(
                SparseMMSettings.from_sources(None))
        print("RESULT" + json.dumps(result), flush=True)
        return 0

    from vllm_sparsemm.testing import checkpoints
    folder = Path(tempfile.mkdtemp()) / args.model
    getattr(checkpoints, MODELS[args.model][0])(folder)
    runs, results = [], []
    if args.baseline:  # stock measured earlier on this machine: reuse it
        results.append(json.loads(Path(args.baseline).read_text())["results"][0])
        results[0]["from"] = args.baseline
    for backend in args.backends.split(","):
        if args.baseline and not backend.startswith("sparsemm"):
            continue
        budgets = (args.budget.split(",") if backend.startswith("sparsemm")
                   else [None])
        runs += [(backend, budget) for budget in budgets]
    for backend, budget in runs:
        argv = [a for a in sys.argv[1:]]
        if budget is not None:
            argv += ["--budget", budget]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   SPARSEMM_BENCH_DIR=str(folder))
        done = subprocess.run([sys.executable, __file__, *argv, "--worker", backend],
                              env=env, capture_output=True, text=True, check=False)
        with open(f"{args.out}.log", "a") as log:  # every worker's full output
            log.write(f"==== {backend} budget={budget}\n{done.stdout}\n"
                      f"{done.stderr}\n")
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
        if lines:
            result = json.loads(lines[-1][len("RESULT"):])
        else:  # keep going: the other runs of the matrix still mean something
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
            result = {"backend": backend, "error": done.stderr[-6000:]}
        result["budget"] = int(budget) if budget is not None else None
        results.append(result)
        _print_row(result)
    import torch
    report = {"model": args.model,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
              else None, "settings": {k: v for k, v in vars(args).items()
                                      if k != "worker"},
              "results": results}
    if not args.latency and results[0].get("seconds"):
        base = results[0]
        for r in results[1:]:
            for key in ("run_output_tok_per_s", "output_tok_per_s",
                        "saturated_output_tok_per_s", "ttft_mean_s"):
                if r.get(key) and base.get(key):
                    r[f"{key}_ratio"] = r[key] / base[key]
            run = r.get("run_output_tok_per_s_ratio")
            saturated = r.get("saturated_output_tok_per_s_ratio")
            print(f"{r['backend']} B={r['budget']} / {base['backend']}: "
                  f"run tok/s {f'{run:.2f}x' if run else 'n/a'}, saturated "
                  f"{f'{saturated:.2f}x' if saturated else 'n/a (not saturated)'}")
            probe = host_probe_ratio(r, base)
            if probe is not None:
                r["host_probe_ratio"] = probe
                if not 1 / HOST_PROBE_TOLERANCE <= probe <= HOST_PROBE_TOLERANCE:
                    print(f"  note: this process's host probe took {probe:.2f}x "
                          "stock's: the host ran at another speed, so ratios of "
                          "host-bound runs do not compare")
    for result in results[1:] if args.latency and "latency" in results[0] else []:
        for stock, ours in zip(results[0]["latency"], result.get("latency", [])):
            ours["ttft_ratio"] = ours["ttft_s"] / stock["ttft_s"]
            ours["decode_ratio"] = (ours["decode_ms_per_token"] /
                                    stock["decode_ms_per_token"])
            print(f"{result['backend']} context {ours['context']}: TTFT "
                  f"{ours['ttft_s'] * 1e3:.1f} ms ({ours['ttft_ratio']:.2f}x "
                  f"stock), decode {ours['decode_ms_per_token']:.2f} ms/token "
                  f"({ours['decode_ratio']:.2f}x stock)")
    Path(args.out).write_text(json.dumps(report, indent=1))
    if not args.latency:
        _print_table(results)
    failed = [r["backend"] for r in results if "error" in r]
    if failed:
        print(f"benchmark.py: runs failed: {', '.join(failed)} (their "
              f"output is in {args.out}.log)", file=sys.stderr)
        return 1
    return 0


def _print_table(results: list[dict]) -> None:
    columns = [("backend", "backend"), ("budget", "B"),
               ("run_output_tok_per_s", "run tok/s"),
               ("run_output_tok_per_s_ratio", "x stock"),
               ("saturated_output_tok_per_s", "sat tok/s"),
               ("saturated_output_tok_per_s_ratio", "x stock"),
               ("output_tok_per_s", "e2e tok/s"), ("ttft_mean_s", "TTFT s"),
               ("ttft_p99_s", "p99 s"), ("decode_ms_per_token_mean", "ms/tok"),
               ("peak_concurrent_requests", "peak dec"),
               ("kv_blocks_per_running_request", "blk/req"),
               ("blocks_held_over_ideal_mean", "held/ideal"),
               ("preemptions", "preempt")]
    print(" | ".join(title for _, title in columns))
    for r in results:
        cells = []
        for key, _ in columns:
            value = r.get(key)
            cells.append("-" if value is None else
                         f"{value:.2f}" if isinstance(value, float) else str(value))
        print(" | ".join(cells))


def _print_row(result: dict) -> None:
    shown = {k: (round(v, 3) if isinstance(v, float) else v)
             for k, v in result.items()
             if k not in ("profile", "error", "timeline")}
    print(json.dumps(shown), flush=True)


if __name__ == "__main__":
    sys.exit(main())
