"""The benchmark's pure accounting: the blocks-held-vs-ideal probe, on the CPU
engine of test_backend_cpu (compressed requests hold the exact per-head ideal
within one block), the saturated window and timeline, on a simulated run, and
the latency medians."""

import itertools
import types

from scripts import load_script
from cpu_engine import Engine


def _benchmark():
    return load_script("benchmark")


def test_held_blocks_are_within_one_block_of_the_exact_ideal():
    bench = _benchmark()
    eng = Engine()
    plans = eng.add_all({"a": 300, "b": 180, "c": 30}, 64, 40)
    samples = []
    for schedule, _, _ in eng.run(plans):
        scheduler = types.SimpleNamespace(
            kv_cache_manager=eng.kv,
            running=[eng.requests[r] for r in schedule])
        samples += bench._held_vs_ideal(scheduler)
    assert len(samples) > 50
    for held, ideal in samples:
        assert ideal <= held < ideal + 1  # ceil of the exact page count


def _simulate(requests, slots, output_len, stop=None):
    """A continuous-batching run, one step per second: each step admits waiting
    requests into free slots (their first token) and gives every decoding
    request a token; returns the step log and first-token/finish times."""
    first, done, log, left = {}, {}, [], {}
    t, tokens = 0, 0
    while len(done) < requests and (stop is None or t < stop):
        t += 1
        for r in range(len(first), min(requests, len(first) + slots - len(left))):
            first[r], left[r] = t, output_len
        for r in list(left):
            tokens, left[r] = tokens + 1, left[r] - 1
            if not left[r]:
                done[r] = t
                del left[r]
        log.append((t, tokens, len(first) - len(done), len(done)))
    return log, first, done


def _window(bench, requests, slots, output_len, stop=None):
    log, first, done = _simulate(requests, slots, output_len, stop)
    return bench.saturated_window(list(first.values()), list(done.values()),
                                  requests, log, log[-1][0])


def test_host_probe_ratio_compares_two_processes_hosts():
    """Stock's probe 10.652 ms against sparsemm's 21.734 ms: a host twice
    as slow for one of two runs meant to compare."""
    bench = _benchmark()
    stock = {"host_cpu": {"python_probe_ms": 10.652}}
    ours = {"host_cpu": {"python_probe_ms": 21.734}}
    assert abs(bench.host_probe_ratio(ours, stock) - 2.04) < 0.01
    assert bench.host_probe_ratio(ours, stock) > bench.HOST_PROBE_TOLERANCE
    assert bench.host_probe_ratio(stock, stock) == 1
    assert bench.host_probe_ratio({"error": "x"}, stock) is None  # failed run
    assert bench.host_probe_ratio(ours, {"host_cpu": {}}) is None  # old JSON


def test_saturated_window_spans_first_finish_to_last_admission():
    # stock-like: 4 waves of 5; finishes at 10, 20, 30, 40, admissions at 1, 11,
    # 21, 31: the window is (10, 31] and 5 requests decode through it
    window = _window(_benchmark(), 20, 5, 10)
    assert window["saturated_window_s"] == 21
    assert window["saturated_output_tok_per_s"] == 5.0
    assert window["saturated_mean_running"] == 5 * 19 / 21  # 0 at 20 and 30
    assert "saturated_note" not in window


def test_saturated_window_of_a_run_cut_while_requests_wait_ends_at_the_cut():
    window = _window(_benchmark(), 20, 5, 10, stop=25)
    assert window["saturated_window_s"] == 15
    assert window["saturated_output_tok_per_s"] == 5.0


def test_no_saturated_throughput_when_every_request_is_admitted_at_once():
    # the budget-64 case: all requests decode together, none waits
    window = _window(_benchmark(), 20, 20, 10)
    assert window["saturated_output_tok_per_s"] is None
    assert window["saturated_window_s"] == 0
    assert window["saturated_note"].startswith("workload too small to saturate")
    assert window["saturated_note"].endswith("(window 0.00 s of 10.00 s)")


def test_no_saturated_throughput_from_a_window_under_a_fifth_of_the_run():
    window = _window(_benchmark(), 20, 18, 10)  # 2 admitted at 11, done at 20
    assert window["saturated_output_tok_per_s"] is None
    assert window["saturated_note"].endswith("(window 1.00 s of 20.00 s)")


def test_timeline_samples_once_a_second_and_stays_small():
    bench = _benchmark()
    log, _, _ = _simulate(20, 5, 10)
    series = bench.timeline(log, log[-1][0])
    assert series == [list(row) for row in log]  # one step per second
    log = [(i / 4, i, 1, 0) for i in range(1, 4001)]  # 1,000 s, 4 steps a second
    series = bench.timeline(log, 1000.0)
    assert len(series) <= 301 and series[-1] == list(log[-1])
    assert all(b[0] - a[0] >= 4 for a, b in zip(series, series[1:]))


def test_latency_figures_are_medians_and_decode_excludes_the_first_token():
    figures = _benchmark().latency_figures([0.05, 0.50, 0.06], [0.70, 0.69, 2.0], 64)
    assert figures["ttft_s"] == 0.06  # the 0.50 outlier does not move it
    assert abs(figures["decode_ms_per_token"] - (0.70 - 0.06) * 1000 / 64) < 1e-9
    assert figures["repeats"] == 3
    assert abs(figures["ttft_spread_s"] - 0.45) < 1e-9


def test_host_clock_splits_each_step_and_puts_everything_back():
    bench = _benchmark()
    calls = []

    class Event:
        def synchronize(self):
            calls.append("sync")

    def part(name, result=None):
        return lambda *args: calls.append(name) or result

    decode = types.SimpleNamespace(total_num_scheduled_tokens=3,
                                   num_scheduled_tokens={"a": 1, "b": 1, "c": 1})
    mixed = types.SimpleNamespace(total_num_scheduled_tokens=9,
                                  num_scheduled_tokens={"a": 1, "b": 8})
    core = types.SimpleNamespace(
        scheduler=types.SimpleNamespace(schedule=None,
                                        update_from_output=part("update")),
        model_executor=types.SimpleNamespace(execute_model=part("execute"),
                                             sample_tokens=part("sample")))
    class Impl:  # an attention backend's impl: one call per layer
        def forward(self):
            calls.append("attn")

    runner = types.SimpleNamespace(_build_attention_metadata=part("meta"),
                                   _model_forward=part("forward"))
    outputs = iter([mixed if step % 4 == 0 else decode for step in range(20)])
    core.scheduler.schedule = lambda: next(outputs)
    originals = (core.scheduler.schedule, Event.synchronize, Impl.forward)
    ticks = itertools.count()
    # a clock that moves 1 ms per reading: each timed call lasts exactly 1 ms
    clock = bench.HostClock(core, runner, Event, Impl,
                            clock=lambda: next(ticks) / 1000)
    for step in range(20):
        core.scheduler.schedule()
        core.model_executor.execute_model()
        runner._build_attention_metadata()
        runner._model_forward()
        for _ in range(3 if step % 4 == 0 else 0):  # eager: prompt steps
            Impl().forward()
        Event().synchronize()
        core.scheduler.update_from_output()
        clock.end_step(0.040 + 0.005 * (step % 8) if step % 4 == 0
                       else 0.010)
    summary = clock.summary()
    # the middle 16 steps (2..17): steps 4, 8, 12, 16 had prompt tokens
    assert summary["decode"]["steps"] == 12 and summary["mixed"]["steps"] == 4
    assert summary["decode"]["step"] == 10.0 and summary["mixed"]["step"] == 50.0
    # mixed steps took 60, 40, 60, 40 ms: the spread shows, the median does not
    assert summary["mixed"]["step_p10"] == 40.0
    assert summary["mixed"]["step_p90"] == 60.0
    assert summary["decode"]["step_p10"] == summary["decode"]["step_p90"] == 10.0
    assert summary["decode"]["sample_tokens"] == 0  # never called
    assert set(summary["decode"]) == {
        "steps", "step", "gpu_wait", "schedule", "update_from_output",
        "execute_model", "sample_tokens", "update_states", "prepare_inputs",
        "attention_metadata", "preprocess", "model_forward",
        "attention_forward", "rows", "step_p10", "step_p90"}
    # what the runner lacks reads 0; the decode steps ran no layer's Python
    assert summary["decode"]["prepare_inputs"] == 0
    assert summary["decode"]["attention_forward"] == 0
    assert summary["mixed"]["attention_forward"] == 3.0  # three layer calls
    assert (summary["decode"]["rows"], summary["mixed"]["rows"]) == (3, 2)
    assert calls.count("sync") == 20 and calls.count("meta") == 20
    assert calls.count("forward") == 20 and calls.count("attn") == 15
    assert (clock.steps[4]["rows"], clock.steps[4]["tokens"]) == (2, 9)
    assert (clock.steps[5]["rows"], clock.steps[5]["tokens"]) == (3, 3)
    clock.close()
    assert (core.scheduler.schedule, Event.synchronize, Impl.forward) == originals
    assert "synchronize" not in vars(Event()) and "schedule" in vars(core.scheduler)


def test_attention_impl_class_is_the_language_models():
    """HostClock times the impl class most attention layers share: the
    language model's backend, not a vision tower's few layers."""
    bench = _benchmark()

    class Text:
        pass

    class Vision:
        pass

    layers = {f"l{i}": types.SimpleNamespace(impl=Text()) for i in range(3)}
    layers["v0"] = types.SimpleNamespace(impl=Vision())
    layers["mlp"] = types.SimpleNamespace()  # no impl: not attention
    config = types.SimpleNamespace(compilation_config=types.SimpleNamespace(
        static_forward_context=layers))
    assert bench._attention_impl_class(config) is Text
    config.compilation_config.static_forward_context = {}
    assert bench._attention_impl_class(config) is None


def test_host_clock_runs_without_the_v1_metadata_hook():
    """Stock vLLM runs the V2 model runner, which has no
    ``_build_attention_metadata``: the clock leaves that part out."""
    bench = _benchmark()

    class Event:
        def synchronize(self):
            pass

    core = types.SimpleNamespace(
        scheduler=types.SimpleNamespace(schedule=lambda: None,
                                        update_from_output=lambda: None),
        model_executor=types.SimpleNamespace(execute_model=lambda: None,
                                             sample_tokens=lambda: None))
    clock = bench.HostClock(core, types.SimpleNamespace(), Event)
    clock.end_step(0.01)
    assert clock.summary()["decode"] == {"steps": 0}
    clock.close()


def test_thread_cpu_tells_the_engine_thread_from_the_others():
    import threading
    import time

    bench = _benchmark()
    probe = bench.ThreadCPU()
    done = threading.Event()

    def spin():  # a thread burning CPU, as an idle intra-op worker spins
        while not done.is_set():
            pass

    worker = threading.Thread(target=spin, name="spinner")
    worker.start()
    time.sleep(0.5)  # the engine thread waits; the other burns
    summary = probe.summary()  # counted while it lives, as workers do
    done.set()
    worker.join()
    assert summary["other_threads_cpu_s"] >= 0.2  # clock ticks of 10 ms
    assert summary["main_thread_cpu_s"] < 0.2  # it only waited in join
    assert summary["busiest_other_threads"][0][1] >= 0.2  # [name, seconds]
    assert summary["python_probe_ms"] > 0 and summary["cpus_allowed"] >= 1


def _profile_window(monkeypatch, decode_flags, **settings):
    """Drive a ProfileWindow over steps whose clock says decode or not;
    returns the window and the steps each kept or dropped profile covered."""
    bench = _benchmark()
    events = []
    monkeypatch.setattr(bench, "_start_profiler", lambda: events.append("start") or "p")
    monkeypatch.setattr(bench, "_end_profiler", lambda p: events.append("drop"))
    monkeypatch.setattr(bench, "_stop_profiler",
                        lambda p, trace: events.append(("keep", trace)) or ("t", 0.5))
    args = types.SimpleNamespace(**{
        "profile_at": 3, "profile_steps": 2, "profile_prompt_step": False,
        "profile_trace": None, "budget": "128", **settings})
    window = bench.ProfileWindow(args, "sparsemm", lambda: 700)
    clock_steps, recorded = [], []
    for step, decode in enumerate(decode_flags):
        window.before_step(step, clock_steps)
        if window.active:
            recorded.append(step)
        clock_steps.append({"decode": decode, "rows": 10 + step,
                            "tokens": 10 + step + (0 if decode else 500)})
    return window, events, recorded


def test_profile_window_records_the_asked_steps(monkeypatch):
    window, events, recorded = _profile_window(monkeypatch, [True] * 10)
    assert recorded == [3, 4] and events == ["start", ("keep", None)]
    assert window.profiled == ("t", 0.5) and not window.active
    assert window.what == {"first_step": 3, "blocks_in_use": 700,
                           "rows": [13, 14], "scheduled_tokens": [13, 14]}


def test_profile_window_keeps_the_first_prompt_step_from_profile_at(monkeypatch):
    flags = [False, False, True, True, True, False, True, False, True]
    window, events, recorded = _profile_window(
        monkeypatch, flags, profile_prompt_step=True, profile_trace="/x/tr.json")
    # steps 3 and 4 decoded and were dropped; 5 was the first prompt step
    assert recorded == [3, 4, 5]
    assert events == ["start", "drop", "start", "drop", "start",
                      ("keep", "/x/tr.sparsemm-b128.json")]
    assert window.profiled == ("t", 0.5) and not window.active
    assert window.what["rows"] == [15] and window.what["scheduled_tokens"] == [515]


def test_profile_window_gives_up_after_its_attempts(monkeypatch):
    bench = _benchmark()
    monkeypatch.setattr(bench.ProfileWindow, "ATTEMPTS", 4)
    window, events, recorded = _profile_window(
        monkeypatch, [True] * 20, profile_prompt_step=True)
    assert recorded == [3, 4, 5, 6] and events.count("drop") == 4
    assert window.profiled is None and window.what is None and not window.active


def test_profile_window_is_shut_without_profile_at(monkeypatch):
    window, events, recorded = _profile_window(
        monkeypatch, [False] * 6, profile_at=0, profile_prompt_step=True)
    assert recorded == [] and events == []


def _recorded_engines(monkeypatch):
    """The benchmark, a stand-in for ``vllm.LLM`` that records each engine's
    keyword arguments (into the list returned), and the args ``_engine``
    reads."""
    import sys
    made = []
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        LLM=lambda **kwargs: made.append(kwargs)))
    args = types.SimpleNamespace(
        model_dir="m", max_model_len=4096, gpu_memory_utilization=0.9,
        max_num_seqs=8, max_num_batched_tokens=None, kv_cache_gib=None,
        model="llava-1.5-7b", enforce_eager=False, max_cudagraph_capture_size=0,
        budget=64, head_scores=None)
    return _benchmark(), made, args


def test_sparsemm_modes_set_graphs_and_decode_kernel(monkeypatch):
    """sparsemm:TRITON and sparsemm:FLASH_ATTN keep full graphs and name
    their decode kernel; the other modes leave it to the user's settings."""
    bench, made, args = _recorded_engines(monkeypatch)
    seen = {}
    # _engine writes these: monkeypatch puts the originals back afterwards
    for name in ("BUDGET", "FULL_CUDA_GRAPHS", "DECODE_KERNEL"):
        monkeypatch.setenv(f"VLLM_SPARSEMM_{name}", "")
    for backend in ("sparsemm", "sparsemm:PIECEWISE", "sparsemm:TRITON",
                    "sparsemm:FLASH_ATTN"):
        monkeypatch.delenv("VLLM_SPARSEMM_DECODE_KERNEL", raising=False)
        bench._engine(args, backend)
        seen[backend] = (bench.os.environ["VLLM_SPARSEMM_FULL_CUDA_GRAPHS"],
                         bench.os.environ.get("VLLM_SPARSEMM_DECODE_KERNEL"))
    assert seen == {"sparsemm": ("1", None), "sparsemm:PIECEWISE": ("0", None),
                    "sparsemm:TRITON": ("1", "triton"),
                    "sparsemm:FLASH_ATTN": ("1", "flash_attn")}
    assert all(kw["attention_backend"] == "sparsemm" for kw in made)
    from vllm_sparsemm.engine.config import DECODE_KERNELS
    assert sorted(m.lower() for m in bench.KERNEL_MODES) == sorted(DECODE_KERNELS)


def test_stock_modes_pick_a_graph_mode_or_the_v1_runner(monkeypatch):
    """FLASH_ATTN:PIECEWISE sets vLLM's CUDA-graph mode; FLASH_ATTN:V1 keeps
    the graphs and runs stock on the V1 model runner, sparsemm's."""
    bench, made, args = _recorded_engines(monkeypatch)
    # _engine sets it: setenv first, so that monkeypatch restores it after
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    bench._engine(args, "FLASH_ATTN:PIECEWISE")
    assert "VLLM_USE_V2_MODEL_RUNNER" not in bench.os.environ
    bench._engine(args, "FLASH_ATTN:V1")
    assert bench.os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert made[0]["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}
    assert "compilation_config" not in made[1]
    assert [kw["attention_backend"] for kw in made] == ["FLASH_ATTN"] * 2


def test_every_bench_matrix_case_parses(tmp_path):
    """benchmarks/bench_matrix.sh's cases, as the script passes them (a stub
    python3 records each command line), all pass benchmark.py's checks."""
    import os
    import shlex
    import subprocess
    from scripts import BENCHMARKS
    bench = _benchmark()
    stub = tmp_path / "python3"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$CASES"\n')
    stub.chmod(0o755)
    cases = tmp_path / "cases.txt"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}",
               CASES=str(cases), BENCH_DIR=str(tmp_path / "bench"))
    listed = subprocess.run(["bash", str(BENCHMARKS / "bench_matrix.sh")],
                            env=env, cwd=BENCHMARKS.parent, check=True,
                            capture_output=True, text=True).stdout
    assert not cases.exists()  # bare: the list, nothing run
    assert " 15  one Qwen2-VL prompt step traced" in listed
    subprocess.run(["bash", str(BENCHMARKS / "bench_matrix.sh"), "all"],
                   env=env, cwd=BENCHMARKS.parent, check=True,
                   capture_output=True)
    lines = cases.read_text().splitlines()
    assert len(lines) == 15
    for line in lines:
        script, *argv = shlex.split(line)
        assert script == "benchmarks/benchmark.py"
        args = bench.parse_args(argv)
        assert args.out.startswith(str(tmp_path / "bench"))
        if args.baseline:  # an earlier case's stock run
            assert any(f"--out {args.baseline}" in other for other in lines)
