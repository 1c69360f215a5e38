"""The reliability suite on the CPU: its command lines against vLLM's own
``serve`` parser, its workloads, its checks on made-up records, the prompt
length search, and whole runs against a fake OpenAI server."""

import base64
import io
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import chat_client as cc  # noqa: E402
import reliability as rel  # noqa: E402
import serve_matrix as sm  # noqa: E402
import server_metrics as prom  # noqa: E402
import server_process as servers  # noqa: E402

# ------------------------------------------------------------ a fake server

IMAGE_TOKENS = 16  # the fake's tokens per image


def render(messages) -> tuple[str, list[str]]:
    """The fake's chat template (LLaVA-like) and the image URLs."""
    text, images = "", []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] \
            if isinstance(content, str) else content
        text += "USER: "
        for part in parts:
            if part["type"] == "image_url":
                images.append(part["image_url"]["url"])
                text += "<image>\n"
            else:
                text += part["text"]
        text += " "
    return text + "ASSISTANT:", images


def prompt_tokens(messages) -> int:
    """A character tokenizer, as the dummy LLaVA folders have."""
    text, images = render(messages)
    return len(text) + IMAGE_TOKENS * len(images)


def open_image(url: str) -> None:
    from PIL import Image
    Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).load()


class FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status: int, data, content_type="application/json"):
        body = (data if isinstance(data, str) else json.dumps(data)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.reply(200, "")
        elif self.path == "/metrics":
            self.reply(200, self.server.metrics(), "text/plain")
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if self.path == "/tokenize":
            count = prompt_tokens(body["messages"])
            self.reply(200, {"count": count, "tokens": [0] * count,
                             "max_model_len": self.server.max_model_len})
        elif self.path == "/v1/chat/completions":
            self.chat(body)
        else:
            self.reply(404, {"error": "not found"})

    def error(self, status: int, message: str):
        self.reply(status, {"error": {"message": message, "code": status}})

    def chat(self, body):
        fake = self.server
        try:
            for url in render(body["messages"])[1]:
                open_image(url)
        except Exception as exc:
            return self.error(400, f"cannot identify image file: {exc}")
        prompt, n = prompt_tokens(body["messages"]), body["max_tokens"]
        if prompt + n > fake.max_model_len:
            return self.error(400, f"maximum context length is "
                              f"{fake.max_model_len} tokens")
        if body.get("vllm_xargs") and fake.xargs_status != 200:
            return self.error(fake.xargs_status, "internal error")
        start = zlib.crc32(json.dumps(body["messages"]).encode())
        words = [f"w{(start + i) % 97} " for i in range(n)]
        usage = {"prompt_tokens": prompt, "completion_tokens": n,
                 "total_tokens": prompt + n}
        with fake.lock:
            fake.running += 1
            fake.held += fake.leak
        try:
            if not body["stream"]:
                return self.reply(200, {"choices": [{"message": {
                    "role": "assistant", "content": "".join(words)}}],
                    "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.event({"choices": [{"delta": {"role": "assistant",
                                               "content": ""}}]})
            for word in words:
                time.sleep(fake.delay)
                while fake.stalled.is_set():  # an SSE comment finds a hang-up
                    time.sleep(0.05)
                    self.wfile.write(b": stalled\n\n")
                self.event({"choices": [{"delta": {"content": word}}]})
            self.event({"choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client dropped the stream
        finally:
            with fake.lock:
                fake.running -= 1

    def event(self, data):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())


class FakeVllm(ThreadingHTTPServer):
    """Chat completions, /tokenize, /metrics and /health, in a thread.

    ``leak`` keeps a KV block per chat request (usage never returns);
    ``xargs_status`` answers requests with vllm_xargs with that status."""
    daemon_threads = True
    request_queue_size = 512

    def __init__(self, port=0, max_model_len=8192, leak=False,
                 xargs_status=200, delay=0.0):
        super().__init__(("127.0.0.1", port), FakeHandler)
        self.max_model_len, self.leak = max_model_len, int(leak)
        self.xargs_status, self.delay = xargs_status, delay
        self.lock, self.running, self.held = threading.Lock(), 0, 0
        self.bodies, self.stalled = [], threading.Event()

    def metrics(self) -> str:
        labels = '{engine="0",model_name="model"}'
        return "".join(f"{name}{labels} {value}\n" for name, value in (
            (rel.RUNNING, self.running), (rel.WAITING, 0),
            (rel.KV_USAGE, self.held / 1000), (rel.PREEMPTIONS, 0.0)))

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


# ------------------------------------------------------ command lines

def _model_dir(path: Path) -> Path:
    from vllm_sparsemm.testing.checkpoints import LLAVA_15_7B
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAVA_15_7B))
    return path


def _args(tmp_path, command, *extra):
    return rel.parse_args([command, "--out", str(tmp_path / "r.json"),
                           "--model", str(_model_dir(tmp_path / "m")), *extra])


def test_serve_commands_parse_with_vllm(tmp_path, vllm_parsers):
    serve_parser, _ = vllm_parsers
    n = len(sm.VLLM)

    def parsed(cmd):
        assert cmd[:n] == sm.VLLM and cmd[n] == "serve"
        return serve_parser.parse_args(cmd[n + 1:])

    args = _args(tmp_path, "load", "--budget", "96", "--server-args",
                 "--gpu-memory-utilization 0.8")
    ctx = rel.context(args)
    stock, sparse = sm.backends(args, [args.budget])
    a = parsed(rel.server_command(args, ctx, stock, 8123))
    assert (a.model_tag, a.load_format, a.port, a.max_model_len) == \
        (str(tmp_path / "m"), "dummy", 8123, 4096)
    assert a.attention_backend == "FLASH_ATTN" and a.served_model_name == \
        ["model"]
    assert a.enable_prefix_caching is None and a.kv_cache_memory_bytes is None
    assert a.gpu_memory_utilization == 0.8
    a = parsed(rel.server_command(args, ctx, sparse, 8123))
    assert a.attention_backend == "sparsemm"
    assert a.additional_config == {"sparsemm": {
        "budget": 96, "head_scores": "llava-v1.6-vicuna-7b"}}

    # faults: a pool for --preempt-fit full-length requests; sparsemm with
    # vLLM's optimistic admission
    args = _args(tmp_path, "faults")
    stock, sparse = sm.backends(args, [args.budget])
    backend, kv = rel.faults_server(args, ctx, sparse, ["preempt"])
    assert kv == 16 * (576 + rel.QUESTION_ALLOWANCE + 512) * 512 * 1024
    a = parsed(rel.server_command(args, ctx, backend, 8124, kv))
    assert a.kv_cache_memory_bytes == kv
    assert a.additional_config["sparsemm"] == {
        "budget": 128, "admission_reserve": 0,
        "head_scores": "llava-v1.6-vicuna-7b"}
    assert rel.faults_server(args, ctx, stock, ["aborts"]) == (stock, None)

    args = _args(tmp_path, "bad-input")
    for name, settings, needle in rel.bad_startups(args, ctx, 64):
        a = parsed(rel.startup_command(args, ctx, settings, 8125))
        assert a.attention_backend == "sparsemm"
        assert a.additional_config == {"sparsemm": settings}
        assert needle.lower() in json.dumps(settings).lower()
    assert "budgte" in rel.bad_startups(args, ctx, 64)[2][1]
    with pytest.raises(ValueError):  # the score file is not JSON
        json.loads((args.work_dir / "bad_scores.json").read_text())


def test_cli_defaults_and_validation(tmp_path):
    load = _args(tmp_path, "load")
    assert (load.num_requests, load.concurrency, load.max_seconds) == \
        (2000, 256, 150.0)
    assert load.log_dir == tmp_path / "r.logs"
    assert load.work_dir == tmp_path / "r.logs" / "work"
    assert _args(tmp_path, "faults").max_seconds == 90.0  # not load's
    assert _args(tmp_path, "faults").parts == "aborts,preempt,restart"
    assert _args(tmp_path, "bad-input").huge_image_size == "8000x8000"
    with pytest.raises(SystemExit):
        _args(tmp_path, "load", "--backends", "stock,nonsense")
    with pytest.raises(SystemExit):
        _args(tmp_path, "load", "--base-url", "http://x", "--backends",
              "stock,sparsemm")


def test_model_shape_arithmetic():
    from vllm_sparsemm.testing.checkpoints import LLAVA_15_7B
    assert rel.kv_bytes_per_token(LLAVA_15_7B) == 512 * 1024
    assert rel.image_tokens(LLAVA_15_7B) == 576
    gqa = {"num_hidden_layers": 2, "num_attention_heads": 8,
           "num_key_value_heads": 2, "hidden_size": 64,
           "torch_dtype": "float32"}
    assert rel.kv_bytes_per_token(gqa) == 2 * 2 * 8 * 2 * 4


@pytest.mark.parametrize("name", ["INTERNVL3_8B", "QWEN2_VL_7B",
                                  "LLAVA_NEXT_VICUNA_7B"])
def test_faults_pool_needs_the_flag_beyond_llava_15(tmp_path, name):
    """The preemption pool is estimated for LLaVA-1.5's one token per patch
    only. InternVL (sizes as lists), Qwen (merged patches) and LLaVA-NeXT
    (tiles) ask for --kv-cache-memory-bytes: a failed check, no crash."""
    from vllm_sparsemm.testing import checkpoints
    config = getattr(checkpoints, name)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    args = rel.parse_args(["faults", "--out", str(tmp_path / "r.json"),
                           "--model", str(folder), "--backends", "stock"])
    ctx = rel.context(args)
    stock = sm.Backend("stock")
    assert rel.image_tokens(config) is None
    assert rel.preempt_kv_bytes(config, 16, 512) is None
    with pytest.raises(RuntimeError, match="give --kv-cache-memory-bytes$"):
        rel.faults_server(args, ctx, stock, ["preempt"])
    assert rel.faults_server(args, ctx, stock, ["aborts"]) == (stock, None)
    record = rel.run_record(args, ctx, "stock", lambda v, r:
                            rel.run_faults(args, ctx, stock, v, r))
    assert not record["passed"] and "serve_cmd" not in record
    [check] = record["checks"]
    assert check["name"] == "ran" and check["detail"].startswith(
        "RuntimeError: ") and check["detail"].endswith(
        "give --kv-cache-memory-bytes")
    args.kv_cache_memory_bytes = 2**30
    assert rel.faults_server(args, ctx, stock, ["preempt"]) == (stock, 2**30)


# ---------------------------------------------------------- workloads

def test_load_workload_shares_and_determinism():
    requests = rel.load_workload(2000, seed=3, size=(16, 16))
    assert len(requests) == 2000
    streaming = [q for q in requests if q.stream]
    assert len(streaming) == 1000
    assert sum(q.tag["image"] is None for q in requests) == 200
    dropping = [q for q in requests if q.disconnect_after is not None]
    assert len(dropping) == 200 and all(q.stream for q in dropping)
    assert len(dropping) >= 0.1 * len(streaming)
    assert all(1 <= q.disconnect_after < q.max_tokens for q in dropping)
    tokens = [q.max_tokens for q in requests]
    assert min(tokens) >= 16 and max(tokens) <= 512 and len(set(tokens)) > 300
    assert all(q.ignore_eos for q in requests)
    shared = [q.tag["image"] for q in requests
              if isinstance(q.tag["image"], int)]
    assert len(shared) > 1000 and len(set(shared)) == 32
    urls = [q.messages[0]["content"][0]["image_url"]["url"] for q in requests
            if q.tag["image"] is not None]
    assert len(set(urls)) == 32 + sum(str(q.tag["image"]).startswith("unique")
                                      for q in requests)
    lengths = [len(json.dumps(q.messages[0]["content"])) for q in requests
               if q.tag["image"] is None]
    long = [q for q in requests if q.tag["long"]]
    assert len(long) == 1000
    assert max(lengths) > 300 > min(lengths)
    again = rel.load_workload(2000, seed=3, size=(16, 16))
    assert [q.body("m") for q in again] == [q.body("m") for q in requests]
    other = rel.load_workload(2000, seed=4, size=(16, 16))
    assert [q.max_tokens for q in other] != tokens


def test_abort_workload_drops_every_stream():
    chunked, early = rel.abort_workload(90, seed=1, size=(16, 16),
                                        max_chunks=8, max_delay=0.5)
    assert (len(chunked), len(early)) == (60, 30)
    assert all(q.stream for q in chunked + early)
    assert all(1 <= q.disconnect_after <= 8 < q.max_tokens for q in chunked)
    assert all(q.disconnect_after is None for q in early)
    assert all(0 <= q.tag["delay"] <= 0.5 for q in early)
    again = rel.abort_workload(90, seed=1, size=(16, 16), max_chunks=8,
                               max_delay=0.5)
    assert [q.tag for q in again[1]] == [q.tag for q in early]


def test_bad_images():
    from PIL import Image
    assert rel.png_url(1, 1, seed=[0, 1]).startswith("data:image/png;base64,")
    big = rel.png_url(3000, 2000)
    image = Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1])))
    assert image.size == (3000, 2000) and len(big) < 200_000
    with pytest.raises(Exception):
        open_image(rel.corrupt_png_url(0))
    assert rel.corrupt_png_url(0) == rel.corrupt_png_url(0)


# -------------------------------------------------------- prompt length

def test_prompt_of_length_with_fake_tokenizers():
    corpus = rel.filler(0, 4000)
    chars = lambda text: len("USER: " + text + " ASSISTANT:")  # noqa: E731
    for target in (32, 128, 129, 4095):
        text = rel.prompt_of_length(chars, target, corpus)
        assert chars(text) == target
    words = lambda text: 3 + len(text.split())  # noqa: E731
    assert words(rel.prompt_of_length(words, 40, corpus)) == 40

    def merging(text):
        """Pairs of letters merge, so a count jumps by two at times."""
        return 5 + sum(2 if w.isalpha() and len(w) % 2 else 1
                       for w in text.split())
    for target in (20, 21, 64):
        assert merging(rel.prompt_of_length(merging, target, corpus)) == target
    with pytest.raises(ValueError, match="template alone"):
        rel.prompt_of_length(chars, 10, corpus)
    with pytest.raises(ValueError):
        rel.prompt_of_length(lambda text: 7, 8, corpus)


# ---------------------------------------------------------- the checks

def _result(**kw):
    return cc.ChatResult(sent=True, ok=True, usage=True, **kw)


def test_token_error_and_finish_checks():
    requests = [cc.ChatRequest([], max_tokens=m, tag={"index": i})
                for i, m in enumerate((5, 7, 9, 11))]
    good = [_result(completion_tokens=5), _result(completion_tokens=7),
            _result(completion_tokens=2, disconnected=True),
            _result(completion_tokens=11)]
    assert rel.check_tokens(requests, good).ok
    assert "3 finished" in rel.check_tokens(requests, good).detail
    short = good[:3] + [_result(completion_tokens=10)]
    check = rel.check_tokens(requests, short)
    assert not check.ok and "#3 got 10 of 11" in check.detail
    no_usage = good[:3] + [cc.ChatResult(sent=True, ok=True,
                                         completion_tokens=11)]
    assert not rel.check_tokens(requests, no_usage).ok
    assert not rel.check_tokens(requests, [cc.ChatResult()] * 4).ok

    assert rel.check_errors(good).ok
    failed = good + [cc.ChatResult(sent=True, http_status=500,
                                   error="HTTP 500: boom"),
                     cc.ChatResult(sent=True, cut=True)]
    check = rel.check_errors(failed)
    assert not check.ok and "1x HTTP 500: boom" in check.detail
    assert rel.check_finished(good).ok
    assert not rel.check_finished(failed).ok


def test_rest_checks():
    assert rel.check_pool(0.0, 0.0).ok
    assert not rel.check_pool(0.0, 0.001).ok
    assert rel.check_pool(0.0, 0.001, tolerance=0.01).ok
    assert not rel.check_pool(None, 0.0).ok
    a = _result(completion_tokens=rel.PROBE_TOKENS, text="same")
    b = _result(completion_tokens=rel.PROBE_TOKENS, text="same")
    assert rel.check_probe(a, b).ok
    assert not rel.check_probe(a, _result(completion_tokens=rel.PROBE_TOKENS,
                                          text="other")).ok
    assert not rel.check_probe(a, cc.ChatResult(error="HTTP 503: dead")).ok
    assert rel.check_idle(True, 5).ok and not rel.check_idle(False, 5).ok

    def metrics(preemptions):
        return prom.parse_prometheus(
            f'vllm:num_preemptions_total{{engine="0"}} {preemptions}\n'
            f'vllm:num_preemptions_created{{engine="0"}} 1.7e9\n')
    assert rel.check_preemptions(metrics(3), metrics(10)).ok
    assert not rel.check_preemptions(metrics(3), metrics(3)).ok
    assert not rel.check_preemptions({}, {}).ok
    assert rel.check_preemptions({}, metrics(1)).ok


def test_case_check():
    case = dict(name="c", status=200, message=None, max_tokens=16,
                completion_tokens=16, prompt_tokens=32,
                prompt_tokens_expected=32, alive=True)
    assert rel.check_case(case).ok
    assert not rel.check_case({**case, "completion_tokens": 15}).ok
    assert not rel.check_case({**case, "prompt_tokens": 33}).ok
    assert rel.check_case({**case, "prompt_tokens_expected": None,
                           "prompt_tokens": 33}).ok
    assert rel.check_case({**case, "status": 400,
                           "message": "HTTP 400: bad image"}).ok
    assert not rel.check_case({**case, "status": 400,
                               "message": "HTTP 400: "}).ok
    assert not rel.check_case({**case, "status": 500,
                               "message": "HTTP 500: oops"}).ok
    assert not rel.check_case({**case, "status": None,
                               "message": "ClientOSError"}).ok
    assert not rel.check_case({**case, "alive": False}).ok


def test_startup_failure_check_and_error_line(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text("vllm serve m --additional-config budgte error\n"
                   "INFO non-default args: {'additional_config': 'budgte'}\n"
                   "ValueError: unknown sparsemm settings ['budgte']; valid\n"
                   "RuntimeError: Engine core initialization failed.\n")
    line = rel.error_line(log, "budgte")
    assert line == "ValueError: unknown sparsemm settings ['budgte']; valid"
    assert rel.error_line(log, "head_scores") is None
    outcome = {"code": 1, "seconds": 12.0, "line": line, "needle": "budgte"}
    assert rel.check_startup_failure("typo", outcome, 60).ok
    assert not rel.check_startup_failure("typo", {**outcome, "code": None},
                                         60).ok
    assert not rel.check_startup_failure("typo", {**outcome, "code": 0}, 60).ok
    assert not rel.check_startup_failure("typo", {**outcome, "line": None},
                                         60).ok


def test_failed_start_records_exit_and_line(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('loading'); "
           "print('HeadScoreError: bad_scores.json: not valid JSON'); "
           "sys.exit(1)"]
    outcome = rel.failed_start(cmd, tmp_path / "s.log", 60, "bad_scores.json")
    assert outcome["code"] == 1
    assert outcome["line"] == "HeadScoreError: bad_scores.json: not valid JSON"


def test_ratios_and_table():
    def run(command, label, figures, checks):
        return {"key": f"{command}/m/{label}", "command": command,
                "model": "m", "label": label,
                "backend": label.split("-")[0], "figures": figures,
                "checks": [{"name": n, "ok": ok, "detail": "d"}
                           for n, ok in checks]}
    fig = dict(completed=100, errors=0, disconnected=10,
               output_throughput=1000.0, p50_e2el_ms=200.0, p99_e2el_ms=800.0)
    runs = [run("load", "stock", fig, [("a", True)]),
            run("load", "sparsemm-b128", {**fig, "output_throughput": 1500.0,
                                          "p99_e2el_ms": 400.0},
                [("a", True), ("b", False)]),
            run("bad-input", "sparsemm-b128", None, [("x", True)])]
    runs = {r["key"]: r for r in runs}
    ratios = rel.compute_ratios(runs)
    assert ratios == {"load/m/sparsemm-b128": {
        "output_throughput": 1.5, "p50_e2el_ms": 1.0, "p99_e2el_ms": 0.5}}
    other = {**runs["load/m/sparsemm-b128"], "workload": {"requests": 9}}
    assert rel.compute_ratios({**runs, other["key"]: other}) == {}
    lines = rel.table(runs, ratios).splitlines()
    assert lines[2].startswith(
        "| load | m | stock | 1/1 | 100 | 0 | 10 | 1000")
    assert "| 1/2 |" in lines[3] and "1500 (1.50x)" in lines[3]
    assert lines[4].startswith("| bad-input | m | sparsemm-b128 | 1/1 | - |")
    assert lines[-1] == "FAIL load/m/sparsemm-b128 b: d"


# ------------------------------------------------ runs against the fake

def _verdicts(out: Path, key: str) -> dict:
    run = json.loads(out.read_text())["runs"][key]
    return {c["name"]: c["ok"] for c in run["checks"]}


def test_bad_input_against_fake_server(tmp_path, capsys):
    out = tmp_path / "r.json"
    common = ["bad-input", "--backends", "sparsemm", "--budget", "64",
              "--image-size", "16x16", "--huge-image-size", "300x200",
              "--model", "fake", "--out", str(out)]
    with FakeVllm(max_model_len=300) as fake:
        assert rel.main([*common, "--base-url", fake.url]) == 0
        tokenized = [b for b in fake.bodies if "messages" in b
                     and "max_tokens" not in b]
    run = json.loads(out.read_text())["runs"]["bad-input/fake/sparsemm-b64"]
    cases = {c["name"]: c for c in run["cases"]}
    assert cases["corrupt image"]["status"] == 400
    assert "cannot identify" in cases["corrupt image"]["message"]
    assert cases["1x1 image"]["status"] == 200
    assert cases["300x200 image"]["status"] == 200
    for name, tokens in (("W=32", 32), ("B=64", 64), ("B+1=65", 65),
                         ("max_model_len-1=299", 299)):
        case = cases[f"prompt of {name} tokens"]
        assert (case["status"], case["prompt_tokens"]) == (200, tokens)
    assert cases["prompt of max_model_len-1=299 tokens"]["max_tokens"] == 1
    assert cases["empty prompt"]["status"] == 200
    assert cases['vllm_xargs {"sparsemm_budget": -5}']["status"] == 200
    assert all(c["alive"] for c in cases.values()) and len(cases) == 11
    assert run["passed"] and tokenized  # lengths came from /tokenize
    printed = capsys.readouterr().out
    assert printed.count("PASS bad-input/fake/sparsemm-b64") == 12
    assert "| bad-input | fake | sparsemm-b64 | 12/12 |" in printed

    # a 5xx is a failure, and so is the exit code
    with FakeVllm(max_model_len=300, xargs_status=500) as fake:
        assert rel.main([*common, "--base-url", fake.url]) == 1
    verdicts = _verdicts(out, "bad-input/fake/sparsemm-b64")
    assert not verdicts['vllm_xargs {"sparsemm_bogus": 1}']
    assert verdicts["corrupt image"] and verdicts["probe unchanged"]


def test_load_against_fake_server(tmp_path):
    out = tmp_path / "r.json"
    common = ["load", "--backends", "stock", "--num-requests", "120",
              "--concurrency", "16", "--num-images", "4", "--image-size",
              "16x16", "--max-tokens-range", "4,12", "--model", "fake",
              "--out", str(out)]
    with FakeVllm() as fake:
        assert rel.main([*common, "--base-url", fake.url]) == 0
        chats = [b for b in fake.bodies if "max_tokens" in b]
    run = json.loads(out.read_text())["runs"]["load/fake/stock"]
    assert run["passed"]
    assert run["workload"] == {"requests": 120, "concurrency": 16,
                               "streaming": 60, "text_only": 12,
                               "planned_disconnects": 12,
                               "shared_image_requests": run["workload"][
                                   "shared_image_requests"]}
    fig = run["figures"]
    assert (fig["completed"], fig["errors"], fig["disconnected"]) == \
        (108, 0, 12)
    assert fig["p99_e2el_ms"] >= fig["p50_e2el_ms"] > 0
    assert all(b["ignore_eos"] and b["temperature"] == 0 for b in chats)
    probes = [b for b in chats if "cache_salt" in b]
    assert len(probes) == 2 and probes[0]["cache_salt"] != \
        probes[1]["cache_salt"]
    records = Path(run["requests_log"]).read_text().splitlines()
    assert len(records) == 120 and "text" not in json.loads(records[0])

    # blocks that never come back fail the pool check
    with FakeVllm(leak=True) as fake:
        assert rel.main([*common, "--base-url", fake.url]) == 1
    verdicts = _verdicts(out, "load/fake/stock")
    assert not verdicts["KV pool back to start"]
    assert verdicts["token counts"] and verdicts["errors"]


# ------------------------------------- faults against a fake vllm serve

FAKE_SERVE = """
import os, signal, subprocess, sys, threading, time
sys.path.insert(0, %r)
from test_reliability import FakeVllm
argv = sys.argv[1:]
assert argv[0] == "serve", argv
if os.environ.get("FAKE_ORPHAN"):  # a child left behind at exit
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
server = FakeVllm(port=int(argv[argv.index("--port") + 1]), delay=0.01)
def stop():
    if os.environ.get("FAKE_HOLD_STREAMS"):  # as vLLM: its streams stall, and
        server.stalled.set()  # the HTTP server waits for them to close
        while server.running:
            time.sleep(0.05)
    server.shutdown()
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop).start())
server.serve_forever()
server.server_close()
""" % str(Path(__file__).resolve().parent)


@pytest.fixture
def fake_serve(tmp_path, monkeypatch):
    """``vllm serve`` is the fake server, until SIGTERM."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVE)
    monkeypatch.setattr(sm, "VLLM", [sys.executable, str(script)])


FAULTS = ["faults", "--backends", "stock", "--image-size", "16x16",
          "--abort-requests", "30", "--abort-concurrency", "8",
          "--abort-delay", "0.05", "--later-requests", "4",
          "--restart-requests", "16", "--restart-concurrency", "8",
          "--restart-after", "0.2", "--shutdown-timeout", "20",
          "--health-timeout", "60"]


def test_faults_aborts_and_restart_against_fake_serve(tmp_path, fake_serve):
    out = tmp_path / "r.json"
    code = rel.main([*FAULTS, "--parts", "aborts,restart", "--model",
                     str(_model_dir(tmp_path / "m")), "--out", str(out)])
    run = json.loads(out.read_text())["runs"]["faults/m/stock"]
    assert code == 0, [c for c in run["checks"] if not c["ok"]]
    names = [c["name"] for c in run["checks"]]
    assert names == [
        "aborts: streams dropped cleanly", "aborts: idle",
        "aborts: KV pool back to start", "aborts: probe unchanged",
        "aborts: later requests complete", "restart: SIGTERM under load",
        "restart: no orphan processes",
        "restart: serves again on the same port"]
    assert run["aborts"]["dropped_early"] == 10
    assert run["restart"]["exit_code"] == 0
    assert not run["restart"]["held_by_open_streams"]
    assert run["kv_cache_memory_bytes"] is None  # no preemption part


def _restart(tmp_path, monkeypatch, *extra, **env):
    """restart_part against a fake started with ``env``: (checks, outcome)."""
    args = _args(tmp_path, *FAULTS, *extra)
    ctx = rel.context(args)
    args.log_dir.mkdir(parents=True)
    port = servers.free_port()
    cmd = rel.server_command(args, ctx, sm.Backend("stock"), port)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proc = servers.start_server(cmd, tmp_path / "s.log", port, 60)
    for name in env:
        monkeypatch.delenv(name)
    v = rel.Verdicts("t")
    try:
        outcome = rel.restart_part(args, rel.Server(
            f"http://127.0.0.1:{port}", proc, cmd, port), v)
    finally:
        servers.stop_process(proc)
    assert servers.group_members(proc.pid) == []
    return {c.name: c for c in v.checks}, outcome


def test_restart_clients_hang_up_on_a_server_that_holds_streams(
        tmp_path, fake_serve, monkeypatch):
    """vLLM's HTTP server waits for the streams it will not finish; the
    clients hang up after --client-patience and the exit is then clean."""
    checks, outcome = _restart(tmp_path, monkeypatch, "--client-patience",
                               "1", FAKE_HOLD_STREAMS="1")
    sigterm = checks["restart: SIGTERM under load"]
    assert sigterm.ok and outcome["held_by_open_streams"]
    assert "until the clients hung up at 1 s" in sigterm.detail
    assert outcome["load"]["cut"] > 0  # the hung-up streams
    assert checks["restart: no orphan processes"].ok


def test_restart_finds_orphans(tmp_path, fake_serve, monkeypatch):
    checks, outcome = _restart(tmp_path, monkeypatch, "--shutdown-timeout",
                               "2", FAKE_ORPHAN="1")
    assert checks["restart: SIGTERM under load"].ok  # the fake itself exits
    assert not checks["restart: no orphan processes"].ok
    assert outcome["left"] and checks["restart: serves again on the same "
                                      "port"].ok
