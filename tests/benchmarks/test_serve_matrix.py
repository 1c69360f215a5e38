"""The serve benchmark on the CPU: its command lines against vLLM's own
parsers, the /metrics arithmetic, ratios and table, the chat client's
workloads and summary, client and driver against a fake OpenAI server, and
the video workload's arms (EVS matched to sparsemm's budget) against vLLM's
own token counts."""

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import chat_client as cc  # noqa: E402
import serve_matrix as sm  # noqa: E402
import server_metrics as prom  # noqa: E402
import server_process as servers  # noqa: E402
import video_budget as vb  # noqa: E402


# ------------------------------------------------------------ fixtures

def _model_dir(path: Path, model_type: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def _args(tmp_path, *extra):
    return sm.parse_args([
        "--model", str(_model_dir(tmp_path / "small", "llava")),
        "--kv8-model", str(_model_dir(tmp_path / "next", "llava_next")),
        "--out", str(tmp_path / "out.json"), *extra])


# ------------------------------------------------- plan and command lines

def test_plan_orders_servers_and_loads(tmp_path):
    args = _args(tmp_path, "--concurrency", "1,64", "--budgets", "128,256",
                 "--sparsemm-config", '{"decode_kernel": "flash_attn"}')
    plans = sm.plan(args)
    labels = [(p.model, p.backend.label, p.kv_bytes) for p in plans]
    assert labels == [
        ("small", "stock", None),
        ("small", "sparsemm-b128+decode_kernel=flash_attn", None),
        ("small", "sparsemm-b256+decode_kernel=flash_attn", None),
        ("next", "stock", 8 * 2**30),
        ("next", "sparsemm-b64+decode_kernel=flash_attn", 8 * 2**30),
        ("next", "sparsemm-b256+decode_kernel=flash_attn", 8 * 2**30)]
    loads = [(ld.workload, ld.concurrency) for ld in plans[0].loads]
    assert loads == [("unique", 1), ("unique", 64), ("questions", 256),
                     ("questions", 64), ("multiturn", 64), ("multiturn", 256)]
    assert plans[1].loads == plans[0].loads  # same load for every backend
    unique = {ld.concurrency: ld.params for ld in plans[0].loads
              if ld.workload == "unique"}
    assert unique[1]["num_prompts"] == 200 and unique[64]["num_prompts"] == 256
    assert unique[1]["image_size"] == (336, 336)
    kv8 = plans[3].loads[0]
    assert (kv8.concurrency, kv8.params["image_size"]) == (256, (672, 672))

    only = sm.plan(_args(tmp_path, "--workloads", "questions",
                         "--backends", "sparsemm"))
    assert [p.backend.label for p in only] == ["sparsemm-b128"]
    assert {ld.workload for ld in only[0].loads} == {"questions"}
    with pytest.raises(SystemExit):
        sm.plan(_args(tmp_path, "--workloads", "nonsense"))


def test_serve_commands_parse_with_vllm(tmp_path, vllm_parsers):
    serve_parser, _ = vllm_parsers
    plans = sm.plan(_args(tmp_path, "--server-args",
                          "--gpu-memory-utilization 0.8"))
    n = len(sm.VLLM)
    parsed = {}
    for p in plans:
        cmd = p.command(8123)
        assert cmd[:n] == sm.VLLM and cmd[n] == "serve"
        parsed[(p.model, p.backend.label)] = serve_parser.parse_args(cmd[n + 1:])
    stock = parsed[("small", "stock")]
    assert stock.model_tag == str(tmp_path / "small")
    assert (stock.load_format, stock.served_model_name, stock.port) == \
        ("dummy", ["model"], 8123)
    assert stock.max_model_len == 4096 and stock.attention_backend == "FLASH_ATTN"
    assert stock.additional_config in (None, {})
    assert stock.enable_prefix_caching is None  # vLLM's default: on
    assert stock.kv_cache_memory_bytes is None
    assert stock.gpu_memory_utilization == 0.8
    sparse = parsed[("small", "sparsemm-b128")]
    assert sparse.attention_backend == "sparsemm"
    assert sparse.additional_config == {"sparsemm": {
        "budget": 128, "head_scores": "llava-v1.6-vicuna-7b"}}
    kv = parsed[("next", "sparsemm-b64")]
    assert kv.kv_cache_memory_bytes == 8589934592
    assert kv.additional_config["sparsemm"]["budget"] == 64


def test_max_model_len_holds_the_longest_multiturn_turn(tmp_path, monkeypatch,
                                                        capsys):
    """Unset, --max-model-len is raised, for every arm alike, to what the
    multiturn load's last turn needs at its longest; set too small, or past
    the model's positions, the plan stops with one line saying what fits."""
    counts = {}  # (prompt tokens, tokens per answer token) by concurrency
    monkeypatch.setattr(sm, "multiturn_prompt_tokens",
                        lambda folder, load: counts.get(load.concurrency))

    def plan(*extra, positions=32768):
        folder = tmp_path / f"ov{positions}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({
            "model_type": "llava_onevision",
            "text_config": {"max_position_embeddings": positions}}))
        return sm.plan(sm.parse_args([
            "--model", str(folder), "--workloads", "multiturn,kv8",
            "--kv8-model", str(_model_dir(tmp_path / "next", "llava_next")),
            "--out", str(tmp_path / "out.json"), *extra]))

    def lengths(plans):
        return [(p.model, p.backend.label, p.max_model_len) for p in plans]

    counts.update({64: (4000, 14), 256: (4552, 14)})
    assert lengths(plan()) == [
        ("ov32768", "stock", 4864), ("ov32768", "sparsemm-b128", 4864),
        ("next", "stock", 4096), ("next", "sparsemm-b64", 4096),
        ("next", "sparsemm-b256", 4096)]  # prompt and answer, rounded up
    assert "--max-model-len 4864" in capsys.readouterr().out
    assert {p.max_model_len for p in plan("--max-model-len", "5000")} == \
        {5000}
    with pytest.raises(SystemExit) as info:
        plan("--max-model-len", "4096")
    assert str(info.value) == (
        "multiturn on ov32768: a last turn can reach 4552 prompt + 64 output "
        "tokens, past --max-model-len 4096: give 4616 or more, or leave it "
        "unset")
    # the prompt less its answers stays: the most answer tokens that fit
    with pytest.raises(SystemExit, match="the model's 4096 positions: give "
                       "--multiturn-output-len 51 or less$"):
        plan(positions=4096)
    counts.update({64: (3000, 14), 256: (3900, 14)})
    assert {p.max_model_len for p in plan()} == {4096}
    counts.clear()  # no processor to count with: the default
    assert {p.max_model_len for p in plan()} == {4096}


def test_serve_rows_cases_plan_the_published_runs(tmp_path):
    """benchmarks/serve_rows.sh's cases, as the script passes them (a stub
    python3 records each argument list), plan distinct runs, among them
    every stored run of the README's serve rows: those with four API
    processes (``@api4``, ``@api4-672``), fp8 KV (``@fp8``), and the 8 GiB
    and video ones."""
    from scripts import BENCHMARKS
    stub = tmp_path / "python3"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; '
                    'done >> "$CASES"; echo >> "$CASES"\n')
    stub.chmod(0o755)
    cases = tmp_path / "cases.txt"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}",
               CASES=str(cases), SERVE_DIR=str(tmp_path / "serve"))
    script = str(BENCHMARKS / "serve_rows.sh")
    listed = subprocess.run(["bash", script], env=env, check=True,
                            capture_output=True, text=True).stdout
    assert not cases.exists() and "  kv8-fp8 " in listed
    bad = subprocess.run(["bash", script, "questions", "nonsense"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no case nonsense" in bad.stderr
    assert not cases.exists()  # a bad name runs nothing
    subprocess.run(["bash", script, "all"], env=env, check=True,
                   capture_output=True, cwd=BENCHMARKS.parent)
    planned = []
    for line in cases.read_text().splitlines():
        path, *argv = line.split("\037")[:-1]
        assert path == "benchmarks/serve_matrix.py"
        assert argv[argv.index("--out") + 1] == str(tmp_path / "serve" /
                                                    "serve.json")
        args = sm.parse_args([*argv, "--work-dir", str(tmp_path / "models")])
        planned += [sm.run_key(ld.name, server.model, ld.concurrency,
                               server.label)
                    for server in sm.plan(args) for ld in server.loads]
    assert len(planned) == len(set(planned)) == 44
    published = {key for path in (BENCHMARKS / "results").glob("*serve*.json")
                 for key in json.loads(path.read_text()).get("runs", {})
                 if key.split("@")[-1] in ("api4", "api4-672", "fp8")
                 or key.split("/")[0] in ("kv8", "video-16f", "video-64f")}
    assert len(published) > 30 and published <= set(planned)


def test_bench_command_parses_with_vllm(tmp_path, vllm_parsers):
    _, bench_parser = vllm_parsers
    load = sm.Load("unique", 16, {"num_prompts": 200, "input_len": 64,
                                  "output_len": 256, "image_size": (400, 300),
                                  "seed": 16})
    cmd = sm.bench_command(tmp_path / "m", 8123, load, tmp_path, "r.json")
    n = len(sm.VLLM)
    assert cmd[:n] == sm.VLLM and cmd[n:n + 2] == ["bench", "serve"]
    a = bench_parser.parse_args(cmd[n + 2:])
    assert (a.backend, a.endpoint, a.dataset_name) == \
        ("openai-chat", "/v1/chat/completions", "random-mm")
    assert (a.host, a.port, a.model, a.served_model_name) == \
        ("127.0.0.1", 8123, str(tmp_path / "m"), "model")
    assert (a.num_prompts, a.max_concurrency, a.seed) == (200, 16, 16)
    assert (a.random_input_len, a.random_output_len) == (64, 256)
    assert a.random_mm_base_items_per_request == 1
    assert a.random_mm_num_mm_items_range_ratio == 0
    assert a.random_mm_limit_mm_per_prompt == {"image": 1, "video": 0}
    assert a.random_mm_bucket_config == {(300, 400, 1): 1.0}  # (H, W, frames)
    assert a.ignore_eos and a.temperature == 0 and a.save_result
    assert (a.result_dir, a.result_filename) == (str(tmp_path), "r.json")
    assert a.metric_percentiles == "50,99"
    assert set(a.percentile_metrics.split(",")) >= {"ttft", "tpot"}


def test_client_command_parses_with_the_client(tmp_path):
    for workload, extra in (("questions", {"num_requests": 2000,
                                           "num_images": 32}),
                            ("multiturn", {"conversations": 256, "turns": 4}),
                            ("video", {"num_requests": 512, "frames": 64})):
        load = sm.Load(workload, 64, {"max_tokens": 64, "image_size": (336, 336),
                                      "seed": 3, **extra})
        cmd = sm.client_command(8123, load, tmp_path / "o.json",
                                tmp_path / "r.jsonl", max_seconds=30)
        assert cmd[:2] == sm.CLIENT
        a = cc.build_parser().parse_args(cmd[2:])
        assert (a.base_url, a.model, a.workload) == \
            ("http://127.0.0.1:8123", "model", workload)
        assert (a.concurrency, a.max_tokens, a.seed, a.max_seconds) == \
            (64, 64, 3, 30)
        assert a.image_size == "336x336"
        if workload == "questions":
            assert (a.num_requests, a.num_images) == (2000, 32)
        elif workload == "video":
            assert (a.num_requests, a.frames) == (512, 64)
        else:
            assert (a.conversations, a.turns) == (256, 4)


# --------------------------------------------------------------- metrics

SAMPLE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="model"} 7.0
vllm:num_requests_running{engine="1",model_name="model"} 5.0
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="model"} %(queries)s
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="model"} 1.7e+09
vllm:prefix_cache_hits_total{engine="0",model_name="model"} %(hits)s
vllm:generation_tokens_total{engine="0",model_name="model"} %(gen)s
vllm:request_success_total{engine="0",finished_reason="length",model_name="model"} %(length)s
vllm:request_success_total{engine="0",finished_reason="abort",model_name="model"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="model"} %(b1)s
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="model"} %(b2)s
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="model"} %(b3)s
vllm:time_to_first_token_seconds_count{engine="0",model_name="model"} %(b3)s
vllm:time_to_first_token_seconds_sum{engine="0",model_name="model"} %(ttft_sum)s
vllm:request_queue_time_seconds_count{engine="0",model_name="model"} %(b3)s
vllm:request_queue_time_seconds_sum{engine="0",model_name="model"} %(queue_sum)s
vllm:cache_config_info{block_size="16",model_name="model",prefix_caching="True"} 1.0
"""


def _sample(**values):
    base = dict(queries=0, hits=0, gen=0, length=0, b1=0, b2=0, b3=0,
                ttft_sum=0, queue_sum=0)
    return prom.parse_prometheus(SAMPLE % {**base, **values})


def test_prometheus_parse_and_counter_differences():
    m = _sample(queries=1000, hits=250)
    assert prom.total(m, "vllm:num_requests_running") == 12.0
    assert prom.total(m, "vllm:num_requests_running", engine="1") == 5.0
    assert prom.total(m, "vllm:prefix_cache_queries_total") == 1000.0
    assert prom.total(m, "vllm:no_such_metric") is None
    assert m["vllm:cache_config_info"][0][0]["prefix_caching"] == "True"
    assert prom.buckets(m, "vllm:time_to_first_token_seconds") == \
        [(0.1, 0.0), (1.0, 0.0), (float("inf"), 0.0)]

    before = _sample(queries=1000, hits=250, gen=10, length=2, b1=1, b2=2,
                     b3=2, ttft_sum=0.6, queue_sum=0.1)
    after = _sample(queries=3000, hits=1250, gen=1010, length=12, b1=1, b2=11,
                    b3=12, ttft_sum=5.6, queue_sum=1.1)
    d = prom.server_delta(before, after)
    assert d["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert (d["generation_tokens"], d["completed"]) == (1000, 10)
    assert d["requests_finished"]["abort"] == 0
    assert d["mean_ttft_ms"] == pytest.approx(500.0)
    # the engine's share of it: queue time from its own histogram
    assert d["mean_queue_ms"] == pytest.approx(100.0)
    assert d["mean_prefill_ms"] is None  # not exported by this server
    # the rank falls in the +Inf bucket: the estimate is the last finite bound
    assert d["p99_ttft_ms"] == pytest.approx(1000.0)
    assert prom.server_delta({}, {})["prefix_cache_hit_rate"] is None
    assert d["admission_waits"] == {"gate": None, "pacer": None}  # stock


def test_sparsemm_counters_over_a_load():
    text = """
vllm:sparsemm_admission_waits_total{model_name="m",reason="gate"} %d
vllm:sparsemm_admission_waits_total{model_name="m",reason="pacer"} %d
vllm:sparsemm_compaction_seconds_sum{model_name="m"} %f
vllm:sparsemm_compaction_seconds_count{model_name="m"} %d
"""
    before = prom.parse_prometheus(text % (2, 0, 0.5, 10))
    after = prom.parse_prometheus(text % (7, 3, 2.0, 40))
    d = prom.server_delta(before, after)
    assert d["admission_waits"] == {"gate": 5, "pacer": 3}
    assert (d["compaction_seconds"], d["compactions"]) == (1.5, 30)


def test_histogram_quantile_interpolates_like_prometheus():
    cumulative = [(1.0, 10.0), (2.0, 30.0), (float("inf"), 30.0)]
    assert prom.histogram_quantile(0.5, cumulative) == pytest.approx(1.25)
    assert prom.histogram_quantile(0.2, cumulative) == pytest.approx(0.6)
    assert prom.histogram_quantile(0.5, []) is None


def test_active_rate_ignores_idle_head_and_tail():
    timeline = [[0.0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0], [1.0, 4, 0, 100, 0],
                [1.5, 4, 0, 300, 0], [2.0, 0, 0, 400, 0], [2.5, 0, 0, 400, 0]]
    assert prom.active_rate(timeline) == pytest.approx(400 / 1.5)
    assert prom.active_rate(timeline[:2]) is None
    assert prom.peak(timeline, 1) == 4


# ------------------------------------------------------ ratios and table

def _run(workload, conc, label, load=None, server=None, cut=False,
         peak_running=10, params=None, budget=128, tag=None):
    backend = label.split("-")[0]  # stock, evs or sparsemm
    run = {"key": sm.run_key(workload, "m", conc, sm.tagged(label, tag)),
           "workload": workload, "model": "m", "concurrency": conc,
           "backend": backend, "label": sm.tagged(label, tag),
           "budget": None if label == "stock" else budget,
           "load_params": params or {"seed": conc, "size": [8, 8]},
           "cut": cut, "load": load,
           "server": server or {"prefix_cache_hit_rate": 0.0},
           "peak_running": peak_running, "load_error": None}
    if tag is not None:  # runs written before server arguments had a tag
        run["server_tag"] = tag
    run["figures"] = sm.figures(run)
    return run


def _load(tok, ttft, p99, tpot, failed=0):
    return {"output_throughput": tok, "mean_ttft_ms": ttft, "p99_ttft_ms": p99,
            "mean_tpot_ms": tpot, "failed": failed, "completed": 100}


def test_ratios_and_table():
    runs = [
        _run("unique", 64, "stock", _load(1000, 100, 400, 20),
             {"prefix_cache_hit_rate": 0.4}, peak_running=64),
        _run("unique", 64, "sparsemm-b128", _load(1500, 50, 100, 25, failed=2),
             {"prefix_cache_hit_rate": 0.0}, peak_running=64),
        # cut: the server's counters stand in for the load's numbers
        _run("kv8", 256, "stock", None, {"output_throughput": 200,
                                         "mean_ttft_ms": 9000,
                                         "p99_ttft_ms": 20000,
                                         "mean_tpot_ms": 30}, cut=True,
             peak_running=5),
        # set against a cut run: both from the server's counters
        _run("kv8", 256, "sparsemm-b64", _load(900, 1000, 3000, 45),
             {"output_throughput": 800, "mean_ttft_ms": 900,
              "p99_ttft_ms": 2000, "mean_tpot_ms": 60}, peak_running=200),
        # measured with other load parameters than stock's: no ratio
        _run("questions", 64, "stock", _load(800, 80, 90, 20)),
        _run("questions", 64, "sparsemm-b128", _load(900, 80, 90, 20),
             params={"seed": 1}),
    ]
    runs = {r["key"]: r for r in runs}
    assert runs["kv8/m/c256/stock"]["figures"]["output_throughput"] == 200
    assert runs["kv8/m/c256/stock"]["figures"]["source"] == "server"
    ratios = sm.compute_ratios(runs)
    assert set(ratios) == {"unique/m/c64/sparsemm-b128", "kv8/m/c256/sparsemm-b64"}
    u = ratios["unique/m/c64/sparsemm-b128"]
    assert u == {"output_throughput": 1.5, "mean_ttft_ms": 0.5,
                 "p99_ttft_ms": 0.25, "mean_tpot_ms": 1.25,
                 "prefix_cache_hit_rate": 0.0, "peak_running": 1.0}
    k = ratios["kv8/m/c256/sparsemm-b64"]
    assert k["output_throughput"] == 4.0 and k["peak_running"] == 40
    assert k["mean_ttft_ms"] == 0.1 and k["p99_ttft_ms"] == 0.1
    assert k["mean_tpot_ms"] == 2.0
    assert k["from_server"]
    assert "prefix_cache_hit_rate" not in k  # stock's is zero

    lines = sm.table(runs, ratios).splitlines()
    assert lines[0].startswith("| workload | model | conc | backend | out tok/s")
    assert lines[0].endswith("| KV blocks/req | errors | tok/s vs EVS |")
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0], r[3]) for r in rows] == [
        ("| unique", "stock"), ("| unique", "sparsemm-b128"),
        ("| questions", "stock"), ("| questions", "sparsemm-b128"),
        ("| kv8", "stock (cut)"), ("| kv8", "sparsemm-b64 (server)")]
    assert rows[1][4:8] == ["1500 (1.50x)", "50.0 (0.50x)", "100.0 (0.25x)",
                            "25.00 (1.25x)"]
    assert rows[1][8] == "0.0% (0.00x)" and rows[1][11] == "2"
    assert rows[0][4] == "1000" and rows[0][8] == "40.0%"
    assert rows[3][4] == "900"  # no ratio across different parameters
    assert rows[4][11] == "-"  # a cut bench run has no error count
    assert rows[5][4:6] == ["800 (4.00x)", "900.0 (0.10x)"]
    assert {r[12] for r in rows} == {"- |"}  # no EVS run to compare with


def test_one_cut_run_sets_its_whole_group_on_the_server_counters():
    """Stock and every run set against it read one source: a cut B=64 arm
    puts the finished B=256 arm and stock on the server's counters too, so
    the rows shown and the ratios agree."""
    server = {"output_throughput": 400, "mean_ttft_ms": 800,
              "p99_ttft_ms": 1600, "mean_tpot_ms": 40}
    runs = [_run("kv8", 256, "stock", _load(500, 1000, 2000, 50),
                 {**server, "output_throughput": 100}),
            _run("kv8", 256, "sparsemm-b64", None, server, cut=True,
                 budget=64),
            _run("kv8", 256, "sparsemm-b256", _load(900, 500, 900, 45),
                 {**server, "output_throughput": 300}, budget=256),
            # another group, all finished: the load generator's numbers
            _run("unique", 64, "stock", _load(1000, 100, 400, 20)),
            _run("unique", 64, "sparsemm-b128", _load(1500, 50, 100, 25))]
    runs = {r["key"]: r for r in runs}
    ratios = sm.compute_ratios(runs)
    assert ratios["kv8/m/c256/stock"] == {"from_server": True}
    cut = ratios["kv8/m/c256/sparsemm-b64"]
    assert cut["output_throughput"] == 4.0 and "from_server" not in cut
    done = ratios["kv8/m/c256/sparsemm-b256"]
    assert done["output_throughput"] == 3.0 and done["from_server"]
    assert "from_server" not in ratios["unique/m/c64/sparsemm-b128"]
    assert ratios["unique/m/c64/sparsemm-b128"]["output_throughput"] == 1.5

    rows = [line.split(" | ") for line in
            sm.table(runs, ratios).splitlines()[2:]]
    assert [(r[0], r[3], r[4]) for r in rows] == [
        ("| unique", "stock", "1000"),
        ("| unique", "sparsemm-b128", "1500 (1.50x)"),
        ("| kv8", "stock (server)", "100"),
        ("| kv8", "sparsemm-b64 (cut)", "400 (4.00x)"),
        ("| kv8", "sparsemm-b256 (server)", "300 (3.00x)")]


def test_table_keeps_each_variant_beside_its_stock_run():
    """A workload's variants (other answers, a fixed rate) share its place
    in the table, each pair of runs together."""
    runs = [_run(w, 256, arm, _load(100, 10, 20, 5))
            for w in ("multiturn-short", "multiturn")
            for arm in ("sparsemm-b128", "stock")]
    runs = {r["key"]: r for r in runs}
    rows = sm.table(runs, sm.compute_ratios(runs)).splitlines()[2:]
    assert [tuple(r.split(" | ")[0:4:3]) for r in rows] == [
        ("| multiturn", "stock"), ("| multiturn", "sparsemm-b128"),
        ("| multiturn-short", "stock"), ("| multiturn-short", "sparsemm-b128")]


def test_results_json_keeps_each_flat_list_or_object_on_one_line():
    data = {"meta": {"gpu": "H100", "invocations": [["a", "--b"], []]},
            "runs": {"k": {"timeline": [{"t": 0.5, "running": 3}, {}],
                           "figures": {"source": "load", "cut": None}}}}
    text = sm.results_json(data)
    assert json.loads(text) == data
    assert text.splitlines() == [
        "{", ' "meta": {', '  "gpu": "H100",', '  "invocations": [',
        '   ["a", "--b"],', "   []", "  ]", " },", ' "runs": {', '  "k": {',
        '   "timeline": [', '    {"t": 0.5, "running": 3},', "    {}",
        "   ],", '   "figures": {"source": "load", "cut": null}', "  }",
        " }", "}"]
    assert sm.results_json([1, "x"]) == '[1, "x"]'


def test_merge_keeps_earlier_runs(tmp_path):
    out = tmp_path / "r.json"
    a = _run("unique", 1, "stock", _load(100, 10, 20, 5))
    b = _run("unique", 1, "sparsemm-b128", _load(150, 10, 20, 5),
             params={"seed": 1, "size": (8, 8)})  # as built, not read back
    sm.merge(out, {a["key"]: a}, ["first"])
    data = sm.merge(out, {b["key"]: b}, ["second"])
    assert set(data["runs"]) == {a["key"], b["key"]}
    assert data["ratios"][b["key"]]["output_throughput"] == 1.5
    assert data["meta"]["invocations"] == [["first"], ["second"]]
    assert json.loads(out.read_text())["table"] == data["table"]


def test_table_only_tabulates_stored_runs_afresh(tmp_path, capsys):
    """--table-only recomputes each run's figures from its stored load and
    counters, so a fix to the tabulation reaches results already taken."""
    out = tmp_path / "r.json"
    a = _run("unique", 1, "stock", _load(100, 10, 20, 5))
    a["figures"]["output_throughput"] = 1  # as an older tabulation left it
    sm.merge(out, {a["key"]: a})
    assert sm.main(["--table-only", "--out", str(out)]) == 0
    assert "| 100 |" in capsys.readouterr().out
    stored = json.loads(out.read_text())["runs"][a["key"]]["figures"]
    assert stored["output_throughput"] == 100


def test_server_args_name_the_runs(tmp_path, vllm_parsers):
    """--server-args become part of every run's label and key (their short
    name, or --label), so runs on other server arguments merge beside the
    plain ones instead of over them."""
    serve_parser, _ = vllm_parsers
    fp8 = ["--server-args", "--kv-cache-dtype fp8 --dtype bfloat16"]
    plans = sm.plan(_args(tmp_path, "--workloads", "kv8", *fp8))
    assert [p.label for p in plans] == [
        "stock@kv-cache-dtype=fp8,dtype=bfloat16",
        "sparsemm-b64@kv-cache-dtype=fp8,dtype=bfloat16",
        "sparsemm-b256@kv-cache-dtype=fp8,dtype=bfloat16"]
    a = serve_parser.parse_args(plans[1].command(8123)[len(sm.VLLM) + 1:])
    assert (a.kv_cache_dtype, a.dtype) == ("fp8", "bfloat16")
    assert a.additional_config["sparsemm"]["budget"] == 64
    named = sm.plan(_args(tmp_path, "--workloads", "kv8", *fp8,
                          "--label", "fp8/bf16"))
    assert [p.label for p in named][:2] == ["stock@fp8_bf16",
                                            "sparsemm-b64@fp8_bf16"]
    for extra in ([], ["--label", ""], ["--server-args", ""]):
        plain = sm.plan(_args(tmp_path, "--workloads", "kv8", *extra))
        assert [p.label for p in plain][:2] == ["stock", "sparsemm-b64"]
    # arguments that read badly in a key go by a hash of them
    config = '--compilation-config \'{"cudagraph_mode": "NONE"}\''
    assert sm.args_tag(config) == sm.args_tag(config)
    assert sm.args_tag(config).startswith("args-")
    assert sm.args_tag(config) != sm.args_tag(config.replace("NONE", "FULL"))
    assert sm.args_tag("--enforce-eager --max-num-seqs 64") == \
        "enforce-eager,max-num-seqs=64"


def test_tagged_runs_pair_with_their_own_stock(tmp_path):
    """A stored results file (runs without a tag) keeps its keys and ratios
    when fp8 runs merge into it; those pair with their own stock run and
    sit apart in the table."""
    stored = Path(__file__).resolve().parents[2] / "benchmarks" / "results" \
        / "h200-4fc2146-serve_questions.json"
    out = tmp_path / "r.json"
    out.write_text(stored.read_text())
    old = json.loads(stored.read_text())
    assert sm.merge(out, {})["ratios"] == old["ratios"]
    run = next(iter(old["runs"].values()))
    tag = "kv-cache-dtype=fp8"
    new = [_run(run["workload"], run["concurrency"], label,
                _load(tok, 100, 200, 20), params=run["load_params"], tag=tag)
           for label, tok in (("stock", 1000), ("sparsemm-b128", 2000))]
    for r in new:
        r["model"] = run["model"]
        r["key"] = sm.run_key(r["workload"], r["model"], r["concurrency"],
                              r["label"])
    data = sm.merge(out, {r["key"]: r for r in new})
    assert set(data["runs"]) == set(old["runs"]) | {r["key"] for r in new}
    assert {k: data["ratios"][k] for k in old["ratios"]} == old["ratios"]
    mine = data["ratios"][new[1]["key"]]
    assert mine["output_throughput"] == 2.0
    rows = [line.split(" | ")[3] for line in data["table"].splitlines()[2:]]
    assert rows == ["stock (cut)", "sparsemm-b128 (cut)", f"stock@{tag}",
                    f"sparsemm-b128@{tag}"]


# --------------------------------------------------- client: workloads

def test_questions_workload():
    requests = cc.questions_workload(2000, 32, seed=5, size=(32, 32))
    assert len(requests) == 2000
    texts = [r.messages[0]["content"][1]["text"] for r in requests]
    urls = [r.messages[0]["content"][0]["image_url"]["url"] for r in requests]
    assert len(set(texts)) == 2000  # every question distinct
    assert len(set(urls)) == 32
    assert all(urls[i] == urls[i % 32] for i in range(2000))
    assert [r.tag["image"] for r in requests[:33]] == list(range(32)) + [0]
    assert urls[0].startswith("data:image/jpeg;base64,")
    again = cc.questions_workload(2000, 32, seed=5, size=(32, 32))
    assert [r.messages for r in again] == [r.messages for r in requests]
    other = cc.questions_workload(40, 32, seed=6, size=(32, 32))
    assert other[0].messages != requests[0].messages
    assert len(set(cc.make_questions(3000))) == 3000  # past the combinations
    short = cc.questions_workload(40, 4, seed=5, size=(32, 32), style="short")
    texts = [r.messages[0]["content"][1]["text"] for r in short]
    assert len(set(texts)) == 40 and max(map(len, texts)) <= 4
    same = cc.questions_workload(40, 4, seed=5, size=(32, 32), style="repeat")
    assert {r.messages[0]["content"][1]["text"] for r in same} == {
        cc.REPEATED_QUESTION}
    with pytest.raises(ValueError, match="question style"):
        cc.make_questions(3, style="terse")


def test_question_styles_are_loads_of_their_own(tmp_path):
    """--questions-style long,short,repeat: each a load on the same servers,
    its runs apart in the JSON, and the client told which."""
    args = _args(tmp_path, "--workloads", "questions",
                 "--questions-concurrency", "256",
                 "--questions-style", "long,short,repeat")
    loads = sm.plan(args)[0].loads
    assert [ld.name for ld in loads] == ["questions", "questions-short",
                                         "questions-repeat"]
    cmds = [sm.client_command(8123, ld, tmp_path / "o.json",
                              tmp_path / "r.jsonl") for ld in loads]
    parsed = [cc.build_parser().parse_args(cmd[2:]) for cmd in cmds]
    assert [a.question_style for a in parsed] == ["long", "short", "repeat"]
    with pytest.raises(SystemExit, match="questions-style"):
        sm.plan(_args(tmp_path, "--workloads", "questions",
                      "--questions-style", "terse"))


def test_answer_styles_are_loads_of_their_own(tmp_path):
    """--multiturn-answers full,short: each a load on the same servers, its
    runs apart in the JSON, its own images (no hit from the other load),
    and the client told which."""
    args = _args(tmp_path, "--workloads", "multiturn",
                 "--multiturn-concurrency", "64,256",
                 "--multiturn-answers", "full,short")
    loads = sm.plan(args)[0].loads
    assert [(ld.name, ld.concurrency) for ld in loads] == [
        ("multiturn", 64), ("multiturn", 256), ("multiturn-short", 64),
        ("multiturn-short", 256)]
    assert len({ld.params["seed"] for ld in loads}) == 4
    cmds = [sm.client_command(8123, ld, tmp_path / "o.json",
                              tmp_path / "r.jsonl") for ld in loads]
    parsed = [cc.build_parser().parse_args(cmd[2:]) for cmd in cmds]
    assert [a.answers for a in parsed] == ["full", "full", "short", "short"]
    with pytest.raises(SystemExit, match="multiturn-answers"):
        sm.plan(_args(tmp_path, "--workloads", "multiturn",
                      "--multiturn-answers", "terse"))


def test_short_answers_are_as_many_characters_as_tokens():
    done = cc.ChatResult(text="<extra_7>:<extra_9>:", completion_tokens=4)
    assert cc.resent_answer(done) == "<extra_7>:<extra_9>:"
    assert cc.resent_answer(done, "short") == "<ext"
    # no usage reported: the answer as returned
    assert cc.resent_answer(cc.ChatResult(text="abc"), "short") == "abc"
    with pytest.raises(ValueError, match="answer style"):
        cc.resent_answer(done, "terse")


def test_request_rates_are_loads_of_their_own(tmp_path, vllm_parsers):
    """--request-rates inf,12: the closed loop, then the same prompts at 12
    requests a second (capped by the concurrency), apart in the JSON."""
    _, bench_parser = vllm_parsers
    args = _args(tmp_path, "--workloads", "unique", "--concurrency", "64",
                 "--request-rates", "inf,12")
    loads = sm.plan(args)[0].loads
    assert [ld.name for ld in loads] == ["unique", "unique-r12"]
    n = len(sm.VLLM) + 2
    parsed = [bench_parser.parse_args(sm.bench_command(
        tmp_path / "m", 8123, ld, tmp_path, "r.json")[n:]) for ld in loads]
    assert [(a.request_rate, a.max_concurrency) for a in parsed] == [
        (float("inf"), 64), (12.0, 64)]
    for wrong in ("0", "-1", "fast", "nan"):
        with pytest.raises(SystemExit, match="request-rates"):
            sm.plan(_args(tmp_path, "--workloads", "unique",
                          "--request-rates", wrong))


def test_multiturn_messages_hold_the_history():
    convs = cc.multiturn_workload(256, 4, seed=1, size=(32, 32))
    assert len(convs) == 256 and all(len(c.questions) == 4 for c in convs)
    assert len({c.image_url for c in convs}) == 256
    assert len({q for c in convs for q in c.questions}) == 1024
    c = convs[0]
    first = cc.conversation_messages(c.image_url, c.questions[:1], [])
    assert first == [cc.user_turn(c.image_url, c.questions[0])]
    last = cc.conversation_messages(c.image_url, c.questions, ["a0", "a1", "a2"])
    assert [m["role"] for m in last] == ["user", "assistant"] * 3 + ["user"]
    assert last[0]["content"][0]["image_url"]["url"] == c.image_url
    assert [m["content"] for m in last[1:]] == [
        "a0", c.questions[1], "a1", c.questions[2], "a2", c.questions[3]]
    with pytest.raises(ValueError):
        cc.conversation_messages(c.image_url, c.questions, ["a0"])
    # the same image bytes for the same seed (prefix-cache hits depend on it)
    assert cc.make_image([1, 2], (16, 16), "PNG") == \
        cc.make_image([1, 2], (16, 16), "PNG")
    assert cc.image_url(0, (8, 8), "PNG").startswith("data:image/png;base64,")


def test_request_body():
    body = cc.ChatRequest([{"role": "user", "content": "hi"}], max_tokens=7,
                          vllm_xargs={"k": 1}).body("model")
    assert body == {"model": "model", "messages": [{"role": "user",
                                                    "content": "hi"}],
                    "max_tokens": 7, "temperature": 0.0, "stream": True,
                    "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                    "vllm_xargs": {"k": 1}}
    plain = cc.ChatRequest([], stream=False, ignore_eos=False).body("m")
    assert "stream_options" not in plain and "ignore_eos" not in plain


def test_summary_arithmetic():
    R = cc.ChatResult
    results = [
        R(sent=True, ok=True, ttft=0.1, latency=1.1, completion_tokens=11,
          prompt_tokens=100),
        R(sent=True, ok=True, ttft=0.3, latency=2.3, completion_tokens=21,
          prompt_tokens=200),
        R(sent=True, ok=True, stream=False, ttft=0.5, latency=0.5,
          completion_tokens=8, prompt_tokens=50),
        R(sent=True, ok=False, http_status=400, error="HTTP 400: too long"),
        R(sent=True, ok=False, http_status=400, error="HTTP 400: too long"),
        R(sent=True, ok=True, disconnected=True, ttft=0.1, latency=0.2,
          completion_tokens=3),
        R(sent=True, cut=True),
        R(cut=True),
    ]
    s = cc.summarize(results, duration=4.0)
    assert (s["num_requests"], s["completed"], s["failed"]) == (8, 3, 2)
    assert (s["disconnected"], s["cut"], s["not_sent"]) == (1, 2, 1)
    assert (s["total_output_tokens"], s["total_input_tokens"]) == (40, 350)
    assert s["output_throughput"] == 10.0
    assert s["request_throughput"] == 0.75
    assert s["total_token_throughput"] == 97.5
    assert s["mean_ttft_ms"] == pytest.approx(300.0)
    assert s["median_ttft_ms"] == pytest.approx(300.0)
    assert s["p99_ttft_ms"] == pytest.approx(496.0)
    assert s["mean_tpot_ms"] == pytest.approx(100.0)  # streamed ones only
    assert s["mean_e2el_ms"] == pytest.approx(1300.0)
    assert s["error_counts"] == {"HTTP 400: too long": 2}
    empty = cc.summarize([], 0.0)
    assert empty["mean_ttft_ms"] is None and empty["output_throughput"] is None


# ------------------------------------------------- a fake OpenAI server

class FakeServer:
    """An OpenAI-style chat server in a background thread: streams
    ``max_tokens`` chunks, answers 400 to a question containing FAIL, and
    keeps vLLM-named counters at /metrics. A POST to /mark/NAME is noted
    in its events, which GET /events lists."""

    def __init__(self, chunk_delay: float = 0.0, port: int = 0):
        self.chunk_delay, self.port = chunk_delay, port
        self.bodies, self.events = [], []
        self.bodies_at_profile = []  # requests received by each profile call
        self.images, self.count = set(), itertools.count()
        self.counters = dict(queries=0, hits=0, gen=0, length=0, running=0)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        self.ready.wait()
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(),
                                         self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _serve(self):
        from aiohttp import web
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        for path in ("/start_profile", "/stop_profile"):
            app.router.add_post(path, self.profile)
        app.router.add_post("/mark/{name}", self.profile)
        app.router.add_get("/events", self.list_events)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def profile(self, request):
        from aiohttp import web
        self.events.append(request.path)
        self.bodies_at_profile.append(len(self.bodies))
        return web.Response(text="")

    async def list_events(self, request):
        from aiohttp import web
        return web.json_response(self.events)

    async def health(self, request):
        from aiohttp import web
        return web.Response(text="")

    async def models(self, request):
        from aiohttp import web
        return web.json_response({"data": [{"id": "model"}]})

    async def metrics(self, request):
        from aiohttp import web
        c = self.counters
        return web.Response(text=(
            f'vllm:num_requests_running{{engine="0"}} {c["running"]}\n'
            f'vllm:num_requests_waiting{{engine="0"}} 0\n'
            f'vllm:prefix_cache_queries_total{{engine="0"}} {c["queries"]}\n'
            f'vllm:prefix_cache_hits_total{{engine="0"}} {c["hits"]}\n'
            f'vllm:generation_tokens_total{{engine="0"}} {c["gen"]}\n'
            'vllm:request_success_total{engine="0",finished_reason="length"} '
            f'{c["length"]}\n'))

    async def chat(self, request):
        from aiohttp import web
        body = await request.json()
        self.bodies.append(body)
        number = next(self.count)
        messages = body["messages"]
        question = " ".join(_parts(messages[-1], "text"))
        if "FAIL" in question:
            return web.json_response({"error": {
                "message": "bad request", "type": "BadRequestError",
                "code": 400}}, status=400)
        if "CUT" in question:  # the stream ends without [DONE]
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b'data: {"choices": [{"delta": '
                                 b'{"content": "x"}}]}\n\n')
            return response
        image = tuple(_parts(messages[0], "image_url"))
        self.counters["queries"] += 100
        if image in self.images:
            self.counters["hits"] += 50
        self.images.add(image)
        max_tokens = body.get("max_tokens") or body["max_completion_tokens"]
        usage = {"prompt_tokens": 10 * len(messages),
                 "completion_tokens": max_tokens}
        pieces = [f"r{number}t{i} " for i in range(max_tokens)]
        self.counters["gen"] += len(pieces)
        if not body["stream"]:
            self.counters["length"] += 1
            return web.json_response({"choices": [{"message": {
                "role": "assistant", "content": "".join(pieces)}}],
                "usage": usage})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(data):
            return f"data: {json.dumps(data)}\n\n".encode()

        self.counters["running"] += 1
        try:
            await response.write(event({"choices": [{"delta": {
                "role": "assistant", "content": ""}}]}))
            for piece in pieces:
                await asyncio.sleep(self.chunk_delay)
                await response.write(event({"choices": [{"delta": {
                    "content": piece}}]}))
            if body.get("stream_options", {}).get("include_usage"):
                await response.write(event({"choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
            self.counters["length"] += 1
            self.events.append("completed")
        except (ConnectionError, asyncio.CancelledError):
            self.events.append("disconnected")
        finally:
            self.counters["running"] -= 1
        return response


def _parts(message: dict, kind: str) -> list[str]:
    """A message's texts or image URLs, whichever form its content has."""
    content = message["content"]
    if isinstance(content, str):
        return [content] if kind == "text" else []
    return [p["text"] if kind == "text" else p["image_url"]["url"]
            for p in content if p["type"] == kind]


def _step_clock():
    """A fake clock: one second per reading."""
    ticks = itertools.count()
    return lambda: float(next(ticks))


def test_client_streaming_and_not_against_fake_server():
    requests = cc.questions_workload(6, 2, size=(16, 16), max_tokens=5,
                                     vllm_xargs={"x": 1})
    requests[1].stream = False
    requests[2].messages = [cc.user_turn(None, "FAIL please")]
    requests[3].messages = [cc.user_turn(None, "CUT short")]
    with FakeServer() as server:
        results, duration = asyncio.run(cc.run_requests(
            server.url, "model", requests, concurrency=3,
            clock=_step_clock()))
    assert len(server.bodies) == 6
    sent = server.bodies[0]
    assert sent["model"] == "model" and sent["ignore_eos"] is True
    assert sent["temperature"] == 0 and sent["max_tokens"] == 5
    assert sent["vllm_xargs"] == {"x": 1}
    assert sum("stream_options" in b for b in server.bodies) == 5
    ok = [r for r in results if r.ok]
    assert len(ok) == 4
    for r in ok:
        assert (r.completion_tokens, r.prompt_tokens, r.usage) == (5, 10, True)
        assert r.text.split() == [f"{r.text.split()[0][:-2]}t{i}"
                                  for i in range(5)]
        assert 0 < r.ttft <= r.latency and r.ttft == int(r.ttft)
    assert results[1].ttft == results[1].latency and not results[1].stream
    bad = results[2]
    assert (bad.ok, bad.http_status) == (False, 400)
    assert "bad request" in bad.error
    assert results[3].error == "stream ended before [DONE]"
    assert results[3].text == "x" and not results[3].ok
    s = cc.summarize(results, duration)
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (4, 2, 20)
    assert s["output_throughput"] == 20 / duration  # the injected clock's


def test_client_disconnects_mid_stream():
    requests = cc.questions_workload(2, 1, size=(16, 16), max_tokens=200)
    for r in requests:
        r.disconnect_after = 3
    with FakeServer(chunk_delay=0.002) as server:
        results, _ = asyncio.run(cc.run_requests(server.url, "model",
                                                 requests, concurrency=2))
        for _ in range(500):  # until the server has noticed both
            if len(server.events) == 2:
                break
            time.sleep(0.01)
    assert server.events == ["disconnected", "disconnected"]
    for r in results:
        assert r.ok and r.disconnected and r.chunks == 3
        assert r.completion_tokens == 3 and not r.usage
    assert cc.summarize(results, 1.0)["disconnected"] == 2


def test_client_cut_at_max_seconds():
    requests = cc.questions_workload(4, 1, size=(16, 16), max_tokens=10**6)
    with FakeServer(chunk_delay=0.01) as server:
        results, _ = asyncio.run(cc.run_requests(
            server.url, "model", requests, concurrency=2, max_seconds=0.2))
    assert [r.cut for r in results] == [True] * 4
    assert [r.sent for r in results] == [True, True, False, False]
    s = cc.summarize(results, 1.0)
    assert (s["completed"], s["failed"], s["cut"], s["not_sent"]) == \
        (0, 0, 4, 2)


def test_multiturn_against_fake_server_resends_answers():
    convs = cc.multiturn_workload(3, 3, size=(16, 16))
    convs[1].questions[1] = "FAIL now"
    with FakeServer() as server:
        results, _ = asyncio.run(cc.run_conversations(
            server.url, "model", convs, concurrency=2, max_tokens=4))
    by_turn = {(r.tag["conversation"], r.tag["turn"]): r for r in results}
    assert len(results) == 9
    assert not by_turn[(1, 1)].ok and not by_turn[(1, 2)].sent
    assert not by_turn[(1, 2)].cut  # stopped by the failure, not a cut
    for c in (0, 2):
        for turn in range(3):
            r = by_turn[(c, turn)]
            assert r.ok and r.prompt_tokens == 10 * (2 * turn + 1)
            body = next(b for b in server.bodies
                        if b["messages"][0]["content"][0]["image_url"]["url"]
                        == convs[c].image_url
                        and len(b["messages"]) == 2 * turn + 1)
            answers = [m["content"] for m in body["messages"]
                       if m["role"] == "assistant"]
            assert answers == [by_turn[(c, t)].text for t in range(turn)]
            assert body["messages"][-1]["content"] == convs[c].questions[turn] \
                or turn == 0
    s = cc.summarize(results, 1.0)
    assert (s["completed"], s["failed"], s["not_sent"]) == (7, 1, 1)


def test_multiturn_short_answers_resend_their_token_count():
    convs = cc.multiturn_workload(2, 3, size=(16, 16))
    with FakeServer() as server:
        results, _ = asyncio.run(cc.run_conversations(
            server.url, "model", convs, concurrency=2, max_tokens=4,
            answers="short"))
    by_turn = {(r.tag["conversation"], r.tag["turn"]): r for r in results}
    last = [b for b in server.bodies if len(b["messages"]) == 5]
    assert len(last) == 2 and all(r.ok for r in results)
    for body in last:
        c = next(i for i, conv in enumerate(convs) if conv.image_url ==
                 body["messages"][0]["content"][0]["image_url"]["url"])
        answers = [m["content"] for m in body["messages"]
                   if m["role"] == "assistant"]
        assert answers == [by_turn[(c, t)].text[:4] for t in range(2)]
        assert all(len(a) == 4 < len(by_turn[(c, 0)].text) for a in answers)


def test_client_cli_writes_summary_and_requests(tmp_path):
    with FakeServer() as server:
        summary = cc.main(["--base-url", server.url, "--workload", "questions",
                           "--num-requests", "4", "--num-images", "2",
                           "--max-tokens", "3", "--image-size", "16x16",
                           "--concurrency", "2", "--out",
                           str(tmp_path / "o.json"), "--requests-out",
                           str(tmp_path / "r.jsonl")])
    assert summary["completed"] == 4
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved["completed"] == 4 and saved["params"]["num_requests"] == 4
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert [json.loads(x)["completion_tokens"] for x in lines] == [3] * 4


# ----------------------------------------------- driver against fakes

def test_measure_runs_the_client_and_reads_the_server(tmp_path):
    plan = sm.ServerPlan("fake-1.5", tmp_path, sm.Backend("stock"), 4096)
    load = sm.Load("questions", 4, {"num_requests": 12, "num_images": 3,
                                    "max_tokens": 5, "image_size": (16, 16),
                                    "seed": 0})
    with FakeServer() as server:
        run = sm.measure(plan, load, server.port, tmp_path, None)
    assert run["key"] == "questions/fake-1.5/c4/stock"
    assert run["server_tag"] == ""
    assert (tmp_path / "questions_fake-1.5_c4_stock.result.json").exists()
    assert (tmp_path / "questions_fake-1.5_c4_stock.log").exists()
    assert run["load_error"] is None and not run["cut"]
    assert run["load"]["completed"] == 12 and run["load"]["failed"] == 0
    assert run["server"]["generation_tokens"] == 60
    assert run["server"]["completed"] == 12
    # three images: the first question about each misses, the rest hit
    assert run["server"]["prefix_cache_hit_rate"] == pytest.approx(0.375)
    assert run["figures"]["source"] == "load"
    assert run["figures"]["output_throughput"] == \
        run["load"]["output_throughput"]
    assert run["timeline"] and run["peak_running"] is not None
    assert run["load_cmd"][:2] == sm.CLIENT


def test_start_server_fails_clearly_when_the_process_exits(tmp_path):
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-c", "print('no GPU here'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="code 3") as info:
        servers.start_server(cmd, log, servers.free_port(), timeout=60)
    assert "no GPU here" in str(info.value)


def test_stop_process_stops_the_whole_group():
    proc = servers.spawn(["sh", "-c", "sleep 60 & sleep 60"],
                         subprocess.DEVNULL)
    for _ in range(500):
        if len(servers.group_members(proc.pid)) >= 2:
            break
        time.sleep(0.01)
    assert len(servers.group_members(proc.pid)) >= 2
    servers.stop_process(proc, grace=10)
    assert proc.poll() is not None and servers.group_members(proc.pid) == []


def test_run_load_cuts_after_the_start_marker(tmp_path):
    slow = [sys.executable, "-c", "print('warming'); print('Starting main "
            "benchmark run...'); import time; time.sleep(60)"]
    code, cut = sm.run_load(slow, tmp_path / "a.log", 0.2,
                            "Starting main benchmark run")
    assert cut and code != 0
    assert "warming" in (tmp_path / "a.log").read_text()
    code, cut = sm.run_load([sys.executable, "-c", "print('done')"],
                            tmp_path / "b.log", 30, "never printed")
    assert (code, cut) == (0, False)


FAKE_VLLM = """
import json, os, sys, time, urllib.request
argv = sys.argv[1:]
if argv[0] == "serve":  # the fake OpenAI server, until SIGTERM
    sys.path.insert(0, %r)
    from test_serve_matrix import FakeServer
    with FakeServer(port=int(argv[argv.index("--port") + 1])):
        time.sleep(600)
assert argv[:2] == ["bench", "serve"], argv
path = os.path.join(argv[argv.index("--result-dir") + 1],
                    argv[argv.index("--result-filename") + 1])
base = "http://127.0.0.1:" + argv[argv.index("--port") + 1]
mode = os.environ.get("FAKE_BENCH", "")
if "--slow-start" in mode:  # builds its requests first, as random-mm does
    time.sleep(1.0)
    urllib.request.urlopen(urllib.request.Request(base + "/mark/main",
                                                  data=b"", method="POST"))
print("Starting main benchmark run...", flush=True)
if "--sleep" in mode:
    time.sleep(60)
if "--slow-start" in mode:  # runs until the profile begins
    for _ in range(600):
        if "/start_profile" in json.load(urllib.request.urlopen(
                base + "/events")):
            break
        time.sleep(0.05)
json.dump({"completed": 3, "failed": 1, "output_throughput": 12.5,
           "mean_ttft_ms": 5.0, "p99_ttft_ms": 9.0, "mean_tpot_ms": 1.0},
          open(path, "w"))
""" % str(Path(__file__).resolve().parent)


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """``vllm serve`` and ``vllm bench serve`` stand-ins."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    monkeypatch.setattr(sm, "VLLM", [sys.executable, str(script)])


def test_measure_reads_bench_results_or_the_server_when_cut(
        tmp_path, monkeypatch, fake_vllm):
    plan = sm.ServerPlan("m-1.5", tmp_path, sm.Backend("sparsemm", 64), 4096,
                         tag="fp8")
    load = sm.Load("kv8", 8, {"num_prompts": 8, "input_len": 4,
                              "output_len": 4, "image_size": (16, 16),
                              "seed": 8})
    with FakeServer() as server:
        run = sm.measure(plan, load, server.port, tmp_path, 30)
        assert not run["cut"] and run["load"]["completed"] == 3
        assert run["figures"]["output_throughput"] == 12.5
        assert run["figures"]["errors"] == 1
        assert run["key"] == "kv8/m-1.5/c8/sparsemm-b64@fp8"
        assert (run["label"], run["server_tag"]) == ("sparsemm-b64@fp8", "fp8")
        assert sm.stock_key(run) == "kv8/m-1.5/c8/stock@fp8"
        plan.loads = [load]
        assert list(sm.failed_runs(plan, "no GPU")) == [run["key"]]

        monkeypatch.setenv("FAKE_BENCH", "--sleep")
        cut = sm.measure(plan, load, server.port, tmp_path, 0.2)
    assert cut["cut"] and cut["load"] is None and cut["load_error"] is None
    assert cut["figures"]["source"] == "server"
    assert cut["figures"]["errors"] is None


def test_profile_counts_from_the_bench_start_marker(tmp_path, monkeypatch,
                                                   fake_vllm):
    """vllm bench serve builds its requests before it sends one: the
    profile window opens only after it says its timed run starts."""
    plan = sm.ServerPlan("m-1.5", tmp_path, sm.Backend("stock"), 4096)
    load = sm.Load("unique", 2, {"num_prompts": 2, "input_len": 4,
                                 "output_len": 4, "image_size": (16, 16),
                                 "seed": 2})
    monkeypatch.setenv("FAKE_BENCH", "--slow-start")
    with FakeServer() as server:
        run = sm.measure(plan, load, server.port, tmp_path, None,
                         profile=(0.1, 60.0))
        events = [e for e in server.events if e.startswith("/")]
    assert events == ["/mark/main", "/start_profile", "/stop_profile"]
    assert run["profiled"]["from"] == "start marker"
    assert run["profiled"]["started"] and run["load"]["completed"] == 3


def test_sigterm_unwinds_the_block_then_the_callers_handler_is_back():
    """SIGTERM inside the block raises SystemExit (servers are stopped on the
    way out), a second is ignored, and afterwards the caller's handler is
    installed again, even when the block was unwound."""
    def mine(*_):
        pass
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(SystemExit) as stopped:
            with sm.sigterm_unwinds():
                assert signal.getsignal(signal.SIGTERM) is sm._on_sigterm
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by the handler
        assert stopped.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_main_runs_every_server_and_merges(tmp_path, fake_vllm, capsys):
    model = _model_dir(tmp_path / "tiny", "llava")
    common = ["--model", str(model), "--concurrency", "2", "--output-len", "3",
              "--image-size", "16x16", "--out", str(tmp_path / "r.json")]
    # one server per backend runs both workloads
    handler = signal.getsignal(signal.SIGTERM)
    assert sm.main(["--workloads", "unique,questions", "--budgets", "64",
                    "--questions-concurrency", "2", "--questions-requests",
                    "4", "--questions-images", "2", *common]) == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's again
    assert len(list((tmp_path / "r.logs").glob("serve_*.log"))) == 2
    # a later invocation adds its runs to the same JSON
    assert sm.main(["--workloads", "unique", "--backends", "sparsemm",
                    "--budgets", "32", *common]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert sorted(data["runs"]) == [
        "questions/tiny/c2/sparsemm-b64", "questions/tiny/c2/stock",
        "unique/tiny/c2/sparsemm-b32", "unique/tiny/c2/sparsemm-b64",
        "unique/tiny/c2/stock"]
    assert data["ratios"]["unique/tiny/c2/sparsemm-b32"][
        "output_throughput"] == 1.0
    assert "questions/tiny/c2/sparsemm-b64" in data["ratios"]
    questions = data["runs"]["questions/tiny/c2/stock"]
    assert questions["load"]["completed"] == 4
    # the warm-up's image is its own: two misses, two hits
    assert questions["server"]["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert Path(questions["server_log"]).exists()
    assert len(data["meta"]["invocations"]) == 2
    assert data["table"] in capsys.readouterr().out


@pytest.mark.parametrize("name, scores", [
    ("llava-1.5-7b", "llava-v1.6-vicuna-7b"),
    ("llava-next-mistral-7b", "llava-v1.6-vicuna-7b"),
    ("qwen2-vl-7b", "uniform"), ("qwen2.5-vl-7b", "uniform"),
    ("qwen3-vl-8b", "uniform"), ("llava-onevision-7b", "uniform"),
    ("internvl3-8b", "uniform")])
def test_each_named_model_is_written_with_scores_that_fit(tmp_path, name,
                                                          scores):
    """A named model's folder is written locally and gets score settings
    the plugin accepts for its shape (no start-up error to meet on a GPU)."""
    from vllm.config import ModelConfig

    from vllm_sparsemm.engine.config import (ModelShape, SparseMMSettings,
                                             resolve_scores)
    label, folder = sm.model_folder(name, tmp_path)
    settings = sm.sparsemm_defaults(folder)
    assert label == name and settings == {"head_scores": scores}
    model = ModelConfig(model=str(folder))
    shape = ModelShape.from_hf_text_config(model.architectures,
                                           model.hf_text_config)
    resolve_scores(SparseMMSettings(**settings), shape)


def test_profiler_config_parses_with_vllm(tmp_path, vllm_parsers):
    """--profile-at gives every server vLLM's torch profiler, worker side,
    its traces in a folder of its own under the log folder."""
    serve_parser, _ = vllm_parsers
    plans = sm.plan(_args(tmp_path, "--profile-at", "5", "--profile-steps",
                          "30"))
    folders = set()
    for p in plans:
        cmd = p.command(8123)
        config = serve_parser.parse_args(cmd[len(sm.VLLM) + 1:]).profiler_config
        assert config.profiler == "torch" and config.ignore_frontend
        assert config.max_iterations == 30
        assert config.torch_profiler_dir.startswith(str(tmp_path.resolve()))
        folders.add(config.torch_profiler_dir)
    assert len(folders) == len(plans)
    assert all("--profiler-config" not in p.command(8123)
               for p in sm.plan(_args(tmp_path)))


def test_measure_profiles_a_window_of_the_load(tmp_path):
    """/start_profile some seconds in, /stop_profile after the window (or at
    the load's end), recorded in the run and marked in the table."""
    plan = sm.ServerPlan("fake-1.5", tmp_path, sm.Backend("stock"), 4096)
    load = sm.Load("questions", 2, {"num_requests": 8, "num_images": 2,
                                    "max_tokens": 20, "image_size": (16, 16),
                                    "seed": 0})
    with FakeServer(chunk_delay=0.05) as server:
        run = sm.measure(plan, load, server.port, tmp_path, None,
                         profile=(0.1, 60.0))
        events = [e for e in server.events if "profile" in e]
    assert events == ["/start_profile", "/stop_profile"]
    assert run["profiled"]["started"] and run["profiled"]["stopped"]
    # counted from the load's first request, not from the client's launch
    assert run["profiled"]["from"] == "first request"
    assert server.bodies_at_profile[0] >= 1
    assert "stock (profiled)" in sm.table({run["key"]: run}, {})
    with FakeServer() as server:
        run = sm.measure(plan, load, server.port, tmp_path, None,
                         profile=(600.0, 1.0))  # the load ends first
        assert not [e for e in server.events if "profile" in e]
    assert not run["profiled"]["started"]
    assert "(profiled)" not in sm.table({run["key"]: run}, {})


# ------------------------------------------------------- video workload

# what the dummy Qwen2.5-VL-7B folder's processor counts for a request of
# 336x336 frames (counting is checked against vLLM's chat path below)
QWEN_TOKENS = {16: {"text": 57, "video": 1152, "per_frame": 144, "steps": 8},
               64: {"text": 57, "video": 4608, "per_frame": 144, "steps": 32}}


@settings(max_examples=300, deadline=None)  # no wall-clock limit
@given(text=st.integers(0, 400), steps=st.integers(1, 128),
       per_frame=st.integers(1, 1500), budget=st.integers(33, 40000))
def test_evs_rate_keeps_what_the_budget_keeps(text, steps, per_frame, budget):
    """At the chosen rate vLLM's own EVS count leaves sparsemm's min(N, B)
    prompt tokens; more only where EVS's floor (the first temporal step) is
    above that, and no pruning where sparsemm compresses nothing."""
    from vllm.multimodal.evs import compute_retained_tokens_count
    video = steps * per_frame
    rate = vb.evs_pruning_rate(text, video, per_frame, budget)
    assert 0.0 <= rate < 1.0
    kept = text + (compute_retained_tokens_count(per_frame, steps, rate)
                   if rate else video)
    assert kept == vb.evs_prompt_kv(text, video, per_frame, rate)
    wanted = vb.sparsemm_prompt_kv(text + video, budget)
    assert kept == max(wanted, text + min(per_frame, video))


def test_arm_prompt_kv_of_each_arm():
    """What each arm keeps of the 7B folder's 64-frame prompt at B = 256."""
    tokens = QWEN_TOKENS[64]
    assert vb.evs_pruning_rate(57, 4608, 144, 256) == 0.956706
    assert vb.arm_prompt_kv("stock", tokens) == 4665
    assert vb.arm_prompt_kv("sparsemm", tokens, 256) == 256
    assert vb.arm_prompt_kv("evs", tokens, 256, 0.956706) == 256
    assert vb.arm_prompt_kv("sparsemm", tokens, 8192) == 4665


def _video_args(tmp_path, model_type="qwen2_5_vl", *extra):
    folder = _model_dir(tmp_path / model_type, model_type)
    return sm.parse_args(["--workloads", "video", "--video-model", str(folder),
                          "--out", str(tmp_path / "out.json"), *extra])


@pytest.fixture
def qwen_tokens(monkeypatch):
    """The 7B folder's counts, without writing one."""
    monkeypatch.setattr(vb, "video_prompt_tokens",
                        lambda folder, frames, size, question:
                        dict(QWEN_TOKENS[frames]))


def test_video_plan_arms_and_commands(tmp_path, vllm_parsers, qwen_tokens):
    """Stock, EVS per budget and frame count (none where sparsemm keeps the
    whole prompt), sparsemm per budget; the EVS flag and its rate only in
    the EVS servers; every server keeps every frame of a video."""
    serve_parser, _ = vllm_parsers
    plans = sm.plan(_video_args(tmp_path, "qwen2_5_vl",
                                "--video-budgets", "256,2048"))
    assert [p.backend.label for p in plans] == [
        "stock", "evs-b256-r0.8268", "evs-b256-r0.9567", "evs-b2048-r0.5678",
        "sparsemm-b256", "sparsemm-b2048"]  # 16 frames: 1,209 < 2,048
    evs_frames = [[ld.params["frames"] for ld in p.loads] for p in plans[1:4]]
    assert evs_frames == [[16], [64], [64]]
    assert [ld.name for ld in plans[0].loads] == ["video-16f", "video-64f"]
    assert plans[4].loads == plans[0].loads
    assert plans[0].loads[1].params == {
        "num_requests": 512, "frames": 64, "max_tokens": 256,
        "image_size": (336, 336), "seed": 256,
        "prompt_tokens": QWEN_TOKENS[64]}
    for p in plans:
        cmd = p.command(8123)
        a = serve_parser.parse_args(cmd[len(sm.VLLM) + 1:])
        assert a.media_io_kwargs == {"video": {"num_frames": -1}}
        assert a.limit_mm_per_prompt == {"image": 0, "video": 1}
        assert (a.kv_cache_memory_bytes, a.max_model_len) == (8 * 2**30, 8192)
        assert a.attention_backend == (
            "sparsemm" if p.backend.name == "sparsemm" else "FLASH_ATTN")
        assert a.video_pruning_rate == p.backend.pruning_rate
        assert ("--video-pruning-rate" in cmd) == (p.backend.name == "evs")
        assert a.enable_prefix_caching is None  # vLLM's default: on
    assert plans[2].backend.pruning_rate == 0.956706
    assert plans[4].backend.sparsemm_config(plans[4].sparsemm_defaults) == {
        "budget": 256, "head_scores": "uniform"}


def test_video_plan_without_evs(tmp_path, qwen_tokens):
    """EVS is set up for Qwen2.5-VL only: another model fails with the way
    out, and runs stock and sparsemm without it."""
    with pytest.raises(SystemExit, match="--backends stock,sparsemm"):
        sm.plan(_video_args(tmp_path, "qwen2_vl"))
    plans = sm.plan(_video_args(tmp_path, "qwen2_vl", "--backends",
                                "stock,sparsemm"))
    assert [p.backend.label for p in plans] == ["stock", "sparsemm-b256"]
    assert "video" not in sm.build_parser().parse_args([]).workloads
    assert "video" in sm.build_parser().format_help()
    assert "--workloads video" in sm.__doc__


def test_odd_video_frames_are_refused(capsys):
    """vLLM's Qwen2-VL loader keeps an even count of a video's frames, where
    the processor the plan counts with pads an odd count up: odd counts
    are refused on the command line, even ones reach the model whole."""
    from vllm.multimodal.video import (Qwen2VLVideoBackend,
                                       VideoSourceMetadata,
                                       VideoTargetMetadata)

    def kept(frames):
        return len(Qwen2VLVideoBackend.compute_frames_index_to_sample(
            VideoSourceMetadata(frames, cc.VIDEO_FPS, frames / cc.VIDEO_FPS),
            VideoTargetMetadata(-1, cc.VIDEO_FPS, 300)))

    assert [kept(n) for n in (4, 16, 63, 64)] == [4, 16, 62, 64]
    assert sm.parse_args(["--video-frames", "4,64"]).video_frames == "4,64"
    for bad in ("16,63", "0", ""):
        with pytest.raises(SystemExit):
            sm.parse_args(["--video-frames", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert ": error: argument --video-frames: frame counts must be " \
            "even" in err[-1]


def test_video_requests_carry_every_frame():
    """One fresh mp4 per request as a data URL, the same on every run, and
    every frame of it decoded by vLLM with the video servers' setting
    (vLLM's default would take 32)."""
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO
    requests = cc.video_workload(3, 16, seed=2, size=(64, 48), max_tokens=7)
    parts = [r.messages[0]["content"] for r in requests]
    urls = [p[0]["video_url"]["url"] for p in parts]
    assert len(set(urls)) == 3
    assert all(u.startswith("data:video/mp4;base64,") for u in urls)
    assert {p[1]["text"] for p in parts} == {cc.VIDEO_QUESTION}
    body = requests[0].body("model")
    assert body["ignore_eos"] and body["max_tokens"] == 7
    again = cc.video_workload(3, 16, seed=2, size=(64, 48))
    assert [r.messages for r in again] == [r.messages for r in requests]
    setting = json.loads(sm.VIDEO_SERVER_ARGS[1])["video"]
    every = VideoMediaIO(ImageMediaIO(), **setting)
    frames, _ = every.load_base64("video/mp4", urls[0].split(",", 1)[1])
    assert frames.shape == (16, 48, 64, 3)
    long = cc.video_url([0], 64, (64, 48)).split(",", 1)[1]
    assert every.load_base64("video/mp4", long)[0].shape[0] == 64
    assert VideoMediaIO(ImageMediaIO()).load_base64(
        "video/mp4", long)[0].shape[0] == 32


def test_kv_blocks_per_request_from_counters_and_pool():
    """KV tokens a request holds at its end: prompt and output, less what
    sparsemm's compaction dropped; in blocks of the server's block size.
    The pool's view: usage x pool blocks / running, over busy samples."""
    text = """
vllm:cache_config_info{block_size="16",model_name="m",num_gpu_blocks="1000"} 1
vllm:request_prompt_tokens_sum{model_name="m"} %d
vllm:request_prompt_tokens_count{model_name="m"} %d
vllm:request_generation_tokens_sum{model_name="m"} %d
vllm:sparsemm_prompt_tokens_full_total{model_name="m"} %d
vllm:sparsemm_prompt_tokens_kept_total{model_name="m"} %f
"""
    before = prom.parse_prometheus(text % (1000, 1, 10, 0, 0))
    # ten requests of 4,665 prompt and 256 output tokens, eight compressed
    after = prom.parse_prometheus(text % (1000 + 46650, 11, 10 + 2560,
                                        8 * 4665, 8 * 256.0))
    delta = prom.server_delta(before, after)
    kv = (2 * 4665 + 8 * 256 + 10 * 256) / 10
    assert prom.kv_tokens_per_request(delta) == pytest.approx(kv)
    assert prom.cache_numbers(before) == (16, 1000)
    assert prom.cache_numbers({}) == (None, None)
    assert prom.kv_tokens_per_request({"finished_requests": 0}) is None
    # a cut load: 30 requests took in 3,000 prompt tokens and were
    # compressed to a tenth; only 10 of them (1,000 prompt tokens) finished
    cut = {"finished_requests": 10, "finished_prompt_tokens": 1000,
           "finished_output_tokens": 500, "prompt_tokens": 3000,
           "compressed_prompt_tokens": 3000,
           "compressed_prompt_tokens_kept": 300}
    assert prom.kv_tokens_per_request(cut) == pytest.approx((100 + 500) / 10)
    timeline = [[0.0, 0, 0, 0, 0.0], [0.5, 10, 0, 0, 0.5],
                [1.0, 20, 0, 0, 0.8]]
    assert prom.pool_blocks_per_request(timeline, 1000) == pytest.approx(45)
    assert prom.pool_blocks_per_request(timeline, None) is None
    fig = sm.figures({"server": delta, "block_size": 16, "timeline": timeline,
                      "num_gpu_blocks": 1000})
    assert fig["kv_blocks_per_request"] == pytest.approx(kv / 16)
    assert fig["pool_blocks_per_request"] == pytest.approx(45)


def _video_run(label, tok, peak, blocks, frames=64, seed=0):
    run = _run(f"video-{frames}f", 256, label, _load(tok, 900, 2000, 30),
               peak_running=peak, params={"frames": frames, "seed": seed},
               budget=256)
    run["figures"]["kv_blocks_per_request"] = blocks
    return run


def test_video_ratios_to_stock_and_to_evs():
    runs = [_video_run("stock", 1000, 30, 306.0),
            _video_run("evs-b256-r0.9567", 3000, 200, 32.0),
            _video_run("sparsemm-b256", 3300, 210, 33.0),
            _video_run("stock", 2000, 100, 90.0, frames=16),
            # measured with other load parameters than EVS's: no ratio
            _video_run("sparsemm-b256", 2500, 250, 32.5, frames=16),
            _video_run("evs-b256-r0.8268", 2600, 250, 32.0, frames=16,
                       seed=1)]
    runs = {r["key"]: r for r in runs}
    ratios = sm.compute_ratios(runs)
    evs = ratios["video-64f/m/c256/evs-b256-r0.9567"]
    assert evs["peak_running"] == pytest.approx(200 / 30)
    assert "vs_evs" not in evs
    mine = ratios["video-64f/m/c256/sparsemm-b256"]
    assert mine["output_throughput"] == pytest.approx(3.3)
    assert mine["peak_running"] == pytest.approx(7.0)
    assert mine["kv_blocks_per_request"] == pytest.approx(33 / 306)
    assert mine["vs_evs"]["output_throughput"] == pytest.approx(1.1)
    assert mine["vs_evs"]["kv_blocks_per_request"] == pytest.approx(33 / 32)
    assert "vs_evs" not in ratios["video-16f/m/c256/sparsemm-b256"]

    rows = [line.split(" | ") for line in
            sm.table(runs, ratios).splitlines()[2:]]
    assert [(r[0], r[3]) for r in rows] == [
        ("| video-16f", "stock"), ("| video-16f", "evs-b256-r0.8268"),
        ("| video-16f", "sparsemm-b256"), ("| video-64f", "stock"),
        ("| video-64f", "evs-b256-r0.9567"), ("| video-64f", "sparsemm-b256")]
    assert rows[5][4] == "3300 (3.30x)" and rows[5][9] == "210 (7.00x)"
    assert rows[5][10] == "33.0 (0.11x)" and rows[5][12] == "1.10x |"
    assert rows[4][12] == "- |" and rows[2][12] == "- |"


def test_main_runs_the_video_arms(tmp_path, fake_vllm, qwen_tokens,
                                  monkeypatch):
    """Stock, EVS and sparsemm servers in turn, each warmed up with a video
    and sent the video load; ratios to stock and to EVS in the JSON."""
    monkeypatch.setitem(QWEN_TOKENS, 4, {"text": 20, "video": 128,
                                         "per_frame": 32, "steps": 2})
    args = _video_args(tmp_path)
    out = tmp_path / "out.json"
    assert sm.main(["--workloads", "video", "--video-model", args.video_model,
                    "--video-frames", "4", "--video-size", "32x32",
                    "--video-num-requests", "3", "--video-concurrency", "2",
                    "--video-output-len", "3", "--video-budgets", "64",
                    "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    stem = "video-4f/qwen2_5_vl/c2/"
    evs = stem + "evs-b64-r0.6523"
    assert sorted(data["runs"]) == [evs, stem + "sparsemm-b64", stem + "stock"]
    run = data["runs"][evs]
    assert run["load"]["completed"] == 3
    assert run["video_pruning_rate"] == 0.652344
    assert run["planned_prompt_kv"] == 64
    assert data["runs"][stem + "stock"]["planned_prompt_kv"] == 148
    assert run["load_cmd"][run["load_cmd"].index("--frames") + 1] == "4"
    assert "vs_evs" in data["ratios"][stem + "sparsemm-b64"]
    assert "tok/s vs EVS" in data["table"]


def _vllm_renderer(serve_parser, cmd: list[str]):
    """vLLM's chat renderer for a planned ``vllm serve`` command (the model
    config is all it needs: no engine, CPU)."""
    from vllm.config import DeviceConfig, VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.registry import renderer_from_config
    args = serve_parser.parse_args(cmd[len(sm.VLLM) + 1:])
    args.model = args.model_tag  # as `vllm serve` sets it
    model = EngineArgs.from_cli_args(args).create_model_config()
    return renderer_from_config(VllmConfig(
        model_config=model, device_config=DeviceConfig(device="cpu")))


def _prompt_tokens(renderer, request: cc.ChatRequest) -> int:
    """A request's prompt length as vLLM's chat endpoint makes it: the
    body validated, rendered, its video loaded and processed."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest)
    body = ChatCompletionRequest(**request.body(sm.SERVED_NAME))
    _, prompts = renderer.render_chat([body.messages],
                                      body.build_chat_params(None, "auto"))
    return len(prompts[0]["prompt_token_ids"])


@pytest.mark.slow
def test_video_servers_keep_the_planned_prompt_tokens(tmp_path, vllm_parsers):
    """Through vLLM's own chat path, for the planned servers' settings and
    the client's requests on the dummy Qwen2.5-VL-7B folder: stock sees the
    prompt the plan counted, EVS at the plan's rate keeps sparsemm's B."""
    serve_parser, _ = vllm_parsers
    plans = sm.plan(sm.parse_args([
        "--workloads", "video", "--video-frames", "16,64",
        "--video-size", "112x112", "--backends", "stock,evs",
        "--out", str(tmp_path / "out.json")]))
    # 16 frames: 185 prompt tokens, within B = 256: no EVS arm
    assert [p.backend.label for p in plans] == ["stock", "evs-b256-r0.6104"]
    seen = []
    for server in plans:
        renderer = _vllm_renderer(serve_parser, server.command(8123))
        for load in server.loads:
            request = cc.video_workload(1, load.params["frames"], 0,
                                        load.params["image_size"])[0]
            tokens = _prompt_tokens(renderer, request)
            assert tokens == sm.planned_prompt_kv(server.backend, load)
            seen.append(tokens)
    assert seen == [185, 569, 256]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(sm.MODELS))
def test_multiturn_fits_each_named_model(tmp_path, vllm_parsers, name):
    """At the defaults, every named model's servers hold the multiturn
    load's last turn at its longest (every answer token the one whose text
    re-tokenizes longest) as vLLM's chat path counts it; a model whose
    positions cannot is refused, and the output length offered fits."""
    serve_parser, _ = vllm_parsers
    argv = ["--model", name, "--workloads", "multiturn", "--work-dir",
            str(tmp_path), "--out", str(tmp_path / "out.json")]
    try:
        plans = sm.plan(sm.parse_args(argv))
        refused = None
    except SystemExit as exc:
        refused = str(exc)
        fits = re.search(r"--multiturn-output-len (\d+) or less$", refused)
        plans = sm.plan(sm.parse_args(
            argv + ["--multiturn-output-len", fits.group(1)]))
    assert {p.max_model_len for p in plans} == {plans[0].max_model_len}
    server = plans[0]
    text, _ = sm.longest_token_text(str(server.model_dir))
    renderer = _vllm_renderer(serve_parser, server.command(8123))

    def longest(p, max_tokens):
        question = max(cc.make_questions(p["conversations"] * p["turns"],
                                         p["seed"]), key=len)
        return _prompt_tokens(renderer, cc.ChatRequest(
            cc.conversation_messages(
                cc.image_url([0], p["image_size"]), [question] * p["turns"],
                [text * max_tokens] * (p["turns"] - 1)),
            max_tokens=max_tokens))

    for load in server.loads:
        p = load.params
        assert longest(p, p["max_tokens"]) + p["max_tokens"] <= \
            server.max_model_len
        if refused:  # the default's answers would not fit the positions
            assert longest(p, 64) + 64 > server.max_model_len
    assert (refused is None) == (name != "llava-next-7b")


def test_warm_up_reaches_every_api_server_with_its_own_images():
    # one request per API server process at least: each has first-request
    # set-up of its own, and a single warm-up request reaches only one
    with FakeServer() as server:
        assert sm.warm_up(server.url, seed=0, requests=5) is None
    assert len(server.bodies) == 5 and len(server.images) == 5
    assert all(b["max_tokens"] == 8 and not b.get("stream")
               for b in server.bodies)
    args = sm.parse_args(["--backends", "stock"])
    assert args.warmup_requests >= 8


def test_short_answers_grow_the_history_by_their_token_count(tmp_path):
    """The longest last turn with short answers: every earlier answer one
    token a character, where full ones re-tokenize ``per_token`` each."""
    _, folder = sm.model_folder("llava-1.5-7b", tmp_path)
    params = {"conversations": 4, "turns": 4, "max_tokens": 64,
              "image_size": (336, 336), "seed": 0}
    full, per_token = sm.multiturn_prompt_tokens(
        folder, sm.Load("multiturn", 4, params))
    short, one = sm.multiturn_prompt_tokens(
        folder, sm.Load("multiturn", 4, {**params, "answers": "short"}))
    assert per_token > 1 and one == 1
    assert full - short == 3 * 64 * (per_token - 1)
