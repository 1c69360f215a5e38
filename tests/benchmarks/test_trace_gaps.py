"""benchmarks/trace_gaps.py: GPU idle time charged to what the host had open."""

import gzip
import json

from scripts import load_script


def _kernel(ts, dur, name="k"):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": 7,
            "ts": ts, "dur": dur}


def _host(ts, dur, name, cat="cpu_op", tid=1):
    return {"ph": "X", "cat": cat, "name": name, "pid": 100, "tid": tid,
            "ts": ts, "dur": dur}


def test_gaps_are_charged_to_the_innermost_and_outermost_host_ranges(tmp_path):
    gaps = load_script("trace_gaps")
    events = [
        _kernel(0, 100), _kernel(50, 100),  # overlapping: busy 0-150
        _kernel(200, 100),  # gap 150-200 (50 us)
        _kernel(1300, 10),  # gap 300-1300 (1,000 us)
        # the engine thread: a runner scope with an attention layer inside
        _host(100, 1300, "gpu_model_runner: preprocess", "user_annotation"),
        _host(140, 40, "vllm::unified_attention_with_output"),
        _host(160, 10, "cudaLaunchKernel", "cuda_runtime"),
        _host(400, 300, "aten::copy_"),
        # another thread's busy op: not the engine's, so never charged
        _host(0, 10, "aten::mm", tid=2), _host(150, 1150, "aten::idle", tid=2),
    ]
    # the engine thread holds the most CPU-op time
    events.append(_host(2000, 2000, "aten::later"))
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + [{"ph": "i", "name": "marker"}]}, f)
    result = gaps.analyse(gaps.load(str(path)))
    assert result["span_ms"] == 1.31 and result["gpu_busy_ms"] == 0.26
    assert result["gpu_idle_ms"] == 1.05
    assert result["gaps"]["10-100 us"] == {"count": 1, "ms": 0.05}
    assert result["gaps"][">1000 us"] == {"count": 1, "ms": 1.0}
    inner = dict(result["idle_by_innermost_host_op_ms"])
    # 150-160, 170-180 in attention; 160-170 in the launch; 180-200 and
    # 300-400, 700-1300 only in the scope; 400-700 in the copy
    assert inner == {"vllm::unified_attention_with_output": 0.02,
                     "cudaLaunchKernel": 0.01, "aten::copy_": 0.3,
                     "gpu_model_runner: preprocess": 0.72}
    outer = dict(result["idle_by_outermost_host_scope_ms"])
    assert outer == {"gpu_model_runner: preprocess": 1.05}
    assert result["largest_gaps"][0] == [1.0, 0.3, "gpu_model_runner: preprocess"]
    # each gap charged to the GPU op that ends it
    assert dict(result["idle_by_next_gpu_op_ms"]) == {"k": 1.05}
    # GPU time per kernel name, overlaps counted in full
    assert result["gpu_time_by_kernel"] == [["k", 0.31, 4]]
    # the engine thread's scopes, GPU busy or not
    assert result["host_time_by_scope"] == [
        ["gpu_model_runner: preprocess", 1.3, 1]]


def test_host_time_by_scope_counts_nested_scopes_of_one_name_once():
    gaps = load_script("trace_gaps")
    events = [_kernel(0, 1000),  # GPU-bound: no gap, the host cost shows
              _host(0, 10, "aten::add"),
              _host(100, 50, "schedule: allocate_slots", "user_annotation"),
              _host(120, 10, "schedule: allocate_slots", "user_annotation"),
              _host(300, 50, "schedule: allocate_slots", "user_annotation"),
              _host(90, 400, "schedule", "user_annotation"),
              _host(0, 900, "step", "user_annotation", tid=2)]  # not the engine
    result = gaps.analyse(events)
    assert result["gpu_idle_ms"] == 0
    assert result["host_time_by_scope"] == [
        ["schedule", 0.4, 1], ["schedule: allocate_slots", 0.1, 3]]


def test_idle_with_nothing_open_is_host_python():
    gaps = load_script("trace_gaps")
    events = [_kernel(0, 10), _kernel(30, 10), _host(0, 5, "aten::add")]
    result = gaps.analyse(events)
    assert dict(result["idle_by_innermost_host_op_ms"]) == {gaps.NO_OP: 0.02}
    assert result["gpu_busy_fraction"] == 0.5


def test_benchmark_busy_fraction_is_the_union_of_gpu_intervals():
    """benchmark.py's profiled busy fraction merges the same way."""
    import types

    from torch.autograd import DeviceType
    load_script("trace_gaps")  # what benchmark.py imports beside itself
    bench = load_script("benchmark")

    def event(lo, hi, device=DeviceType.CUDA):
        return types.SimpleNamespace(device_type=device, time_range=types.
                                     SimpleNamespace(start=lo, end=hi))

    profiler = types.SimpleNamespace(events=lambda: [
        event(30, 40), event(0, 10), event(5, 15), event(0, 100, DeviceType.CPU)])
    assert bench._gpu_busy_fraction(profiler) == 25 / 40
    assert bench._gpu_busy_fraction(types.SimpleNamespace(events=list)) != (
        bench._gpu_busy_fraction(types.SimpleNamespace(events=list)))  # nan


def test_gaps_are_charged_to_the_gpu_op_that_ends_them():
    """In a piecewise step the host launches attention between graph pieces:
    a gap before an attention kernel is the host's attention path."""
    gaps = load_script("trace_gaps")
    events = [_kernel(0, 10, "gemm"), _kernel(40, 10, "_decode_kernel"),
              _kernel(50, 10, "gemm"), _kernel(65, 10, "_decode_kernel"),
              _kernel(65, 5, "copy"), _kernel(100, 10, "gemm"),
              _host(0, 5, "aten::add")]
    result = gaps.analyse(events)
    # 10-40 and 60-65 end in decode launches; 75-100 in a GEMM
    assert result["idle_by_next_gpu_op_ms"] == [["_decode_kernel", 0.035],
                                                ["gemm", 0.025]]


def test_attention_calls_split_host_time_into_ops_and_python():
    gaps = load_script("trace_gaps")
    host = sorted([
        # (start, end, name); 100 us: children cover 10-30 and 50-70
        (0, 100, gaps.ATTENTION),
        (10, 30, "aten::index_select"), (20, 25, "aten::empty"),
        (50, 70, "cuLaunchKernelEx"),
        (200, 240, gaps.ATTENTION),  # 40 us, all Python
        (300, 400, "aten::mm"),
    ], key=lambda h: (h[0], -h[1]))
    calls = gaps.attention_calls(host)
    assert calls == {"calls": 2, "median_ms": 0.04, "p90_ms": 0.04,
                     "median_python_ms": 0.04}
    host += [(500, 560, gaps.ATTENTION), (510, 530, "aten::sort")]
    calls = gaps.attention_calls(sorted(host))  # Python: 60, 40 and 40 us
    assert calls["median_ms"] == 0.06 and calls["median_python_ms"] == 0.04
    assert calls["p90_ms"] == 0.06
    assert gaps.attention_calls([]) == {"calls": 0}


def test_steps_split_prompt_and_decode_steps_by_vllm_annotations():
    """vLLM names each step's range by its prompt and decode tokens; GPU work
    counts for the step that launched it, even when it runs after."""
    gaps = load_script("trace_gaps")

    def launch(ts, correlation):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel",
                "pid": 100, "tid": 1, "ts": ts, "dur": 2,
                "args": {"correlation": correlation}}

    def kernel(ts, dur, correlation):
        return dict(_kernel(ts, dur), args={"correlation": correlation})

    step = "user_annotation"
    events = [
        _host(0, 80, "execute_context_1(600)_generation_40(40)", step),
        _host(10, 30, gaps.ATTENTION), launch(20, 1),
        kernel(30, 50, 1),
        _host(100, 10, "execute_context_0(0)_generation_41(41)", step),
        launch(105, 2), kernel(115, 20, 2), kernel(300, 10, 3),  # 3: unmatched
        _host(130, 10, "execute_context_0(0)_generation_41(41)", step),
        launch(132, 4), kernel(200, 40, 4),  # runs after its step's range
        _host(400, 5, "execute_context_0(0)_generation_41(41)", step),
    ]
    result = gaps.analyse(events)["steps"]
    assert result["prompt"] == {"steps": 1, "wall_ms": 0.1, "host_ms": 0.08,
                                "gpu_ms": 0.05, "attention_ms": 0.03,
                                "prompt_tokens": 600.0}
    # kernel 3, with no launch, counts by its own start (the third range);
    # the last range has no next step and is left out
    assert result["decode"] == {"steps": 2, "wall_ms": 0.15, "host_ms": 0.01,
                                "gpu_ms": 0.035, "attention_ms": 0.0,
                                "prompt_tokens": 0.0}
