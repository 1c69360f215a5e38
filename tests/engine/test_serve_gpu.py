"""`vllm serve` with the sparsemm backend, as a user runs it.

A LLaVA-1.5-7B-shaped model (real config, dummy weights) in vLLM's default
compile mode; the authors' Vicuna-7B head scores fit its 32 x 32 heads. Image
chats through the OpenAI-client example (streaming and not), per-request
budgets whose kept tokens and freed blocks on ``/metrics`` are the ones
``vllm-sparsemm plan`` computes, and bad budgets answered with HTTP 400.
The ``/metrics`` lines land next to the server log (``SPARSEMM_SERVE_LOG``).
"""

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=120):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


ROOT = Path(__file__).resolve().parents[2]
SCORES = "llava-v1.6-vicuna-7b"
QUESTION = ("Describe this picture in detail: its colours, its shapes, what "
            "stands out, and anything written in it. " * 4)


def _image_url(seed, size=(400, 300)):
    from PIL import Image
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).random((size[1], size[0], 3)) * 255
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(port, seed, budget=None, max_tokens=16):
    body = {"model": "llava", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _image_url(seed)}},
                {"type": "text", "text": QUESTION}]}]}
    if budget is not None:
        body["vllm_xargs"] = {"sparsemm_budget": budget}
    return _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)


def _sparsemm_metrics(port) -> dict[str, float]:
    """The vllm:sparsemm_* samples of /metrics, summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                  timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:sparsemm_"):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _after_compressions(port, count, timeout=15.0):
    """/metrics once the counters show ``count`` compressed requests (the
    engine writes them at most once a second, and when it goes idle)."""
    deadline = time.time() + timeout
    while True:
        now = _sparsemm_metrics(port)
        if now.get("vllm:sparsemm_requests_compressed_total", 0) >= count:
            return now
        assert time.time() < deadline, ("the compression counters did not "
                                        f"reach {count}: {now}")
        time.sleep(0.5)


def _settings(log_text):
    line = re.search(r"sparsemm: budget=(\d+) window=(\d+) ratio=(\S+) .*"
                     r"block_size=(\d+)", log_text)
    assert line, "no start-up settings line in the server log"
    return {"budget": int(line[1]), "window": int(line[2]),
            "ratio": float(line[3]), "block_size": int(line[4])}


def _check_budgets(port, settings, record):
    """Budgets 64 and 512 from vllm_xargs: each request's kept tokens and
    freed blocks on /metrics equal its plan."""
    from vllm_sparsemm.tools.plan_report import plan_report
    time.sleep(2.0)  # the earlier requests' counts reach the files
    before = _after_compressions(port, 0)
    done = before.get("vllm:sparsemm_requests_compressed_total", 0)
    for seed, budget in ((11, 64), (12, 512)):
        reply = _chat(port, seed, budget=budget)
        prompt_len = reply["usage"]["prompt_tokens"]
        done += 1
        after = _after_compressions(port, done)
        plan = plan_report(SCORES, budget, prompt_len,
                           block_size=settings["block_size"],
                           window=settings["window"], ratio=settings["ratio"])
        assert plan["compressed"], (budget, prompt_len)
        kept = (after["vllm:sparsemm_prompt_tokens_kept_total"] -
                before.get("vllm:sparsemm_prompt_tokens_kept_total", 0))
        freed = (after["vllm:sparsemm_blocks_freed_total"] -
                 before.get("vllm:sparsemm_blocks_freed_total", 0))
        held = plan["full_blocks"] - freed
        record[budget] = dict(prompt_len=prompt_len, kept=kept, freed=freed,
                              held=held, plan_held=plan["compressed_blocks"],
                              full=plan["full_blocks"])
        print(f"served: budget {budget}: prompt {prompt_len} tokens, kept "
              f"{kept:.1f} per head, blocks held {held:.0f} of "
              f"{plan['full_blocks']} (plan {plan['compressed_blocks']})")
        assert kept == pytest.approx(float(np.mean(plan["kept"])), abs=1e-3)
        assert held == plan["compressed_blocks"]
        before = after
    assert record[64]["held"] < record[512]["held"]


def _check_bad_budgets(port):
    for bad in (-5, 16, "lots", {"sparsemm_bogus": 1}):
        xargs = bad if isinstance(bad, dict) else {"sparsemm_budget": bad}
        body = {"model": "llava", "max_tokens": 4, "vllm_xargs": xargs,
                "messages": [{"role": "user", "content": "hello"}]}
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
        message = refused.value.read().decode()
        print(f"served: bad {xargs}: HTTP {refused.value.code} {message[:160]}")
        assert refused.value.code == 400
        assert "sparsemm_" in message


def _client_example(port, *args):
    """examples/openai_client.py against the server, as its docstring says."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples/openai_client.py"),
         "--base-url", f"http://127.0.0.1:{port}/v1", "--max-tokens", "24",
         *args], capture_output=True, text=True, timeout=120)


def test_serve_chat_completion_with_image(tmp_path):

    from vllm_sparsemm.testing.checkpoints import write_dummy_llava_15_7b
    model = write_dummy_llava_15_7b(tmp_path / "llava-1.5-7b")
    port = _free_port()
    log = open(os.environ.get("SPARSEMM_SERVE_LOG", tmp_path / "serve.log"), "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
         "--load-format", "dummy", "--attention-backend", "sparsemm",
         "--additional-config",
         '{"sparsemm": {"budget": 128, "head_scores": "llava-v1.6-vicuna-7b"}}',
         "--max-model-len", "4096", "--gpu-memory-utilization", "0.5",
         "--port", str(port), "--served-model-name", "llava"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 420
        while True:
            assert server.poll() is None, "server exited; see its log"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not start"
                time.sleep(2)
        url = _image_url(0)
        reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": "llava", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in this picture?"}]}]})
        choice = reply["choices"][0]
        assert reply["usage"]["prompt_tokens"] > 576  # the image is in the prompt
        assert reply["usage"]["completion_tokens"] == 16
        assert isinstance(choice["message"]["content"], str)
        # sparsemm served it, not a silent fallback to stock attention: it
        # compressed the prompt, with prefix caching on (vLLM's default)
        log.flush()
        text = open(log.name).read()
        assert "prefix_caching=on" in text
        assert "sparsemm: compressing prompts" in text

        for args in ((), ("--stream", "--budget", "64")):
            done = _client_example(port, *args)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip()
        refused = _client_example(port, "--budget", "-5")
        assert refused.returncode == 2 and "(400)" in refused.stderr
        budgets = {}
        _check_budgets(port, _settings(text), budgets)
        _check_bad_budgets(port)
        lines = [line for line in urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            .splitlines() if line.startswith("vllm:sparsemm_")]
        Path(log.name).with_suffix(".metrics.txt").write_text(
            "\n".join(lines) + "\n" + json.dumps(budgets) + "\n")
        assert any(line.startswith("vllm:sparsemm_compaction_seconds_count")
                   for line in lines)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
