"""`vllm serve` with the sparsemm backend, as a user runs it.

A LLaVA-1.5-7B-shaped model (real config, dummy weights) in vLLM's default
compile mode; the authors' Vicuna-7B head scores fit its 32 x 32 heads. Image
chats through the OpenAI-client example (streaming and not), per-request
budgets whose kept tokens and freed blocks on ``/metrics`` are the ones
``vllm-sparsemm plan`` computes, and bad budgets answered with HTTP 400.
With several API servers (``--api-server-count``), every one of them serves
the sparsemm metrics, each family once.
The ``/metrics`` lines land next to the server log (``SPARSEMM_SERVE_LOG``).
"""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serving import (SEVEN_B_POOL, after_compressions, compression_since,
                     fixed_pool, image_data_url, late_sparsemm_builds,
                     logged_settings, post, serve_log, served,
                     settled_metrics, sparsemm_metrics)

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SCORES = "llava-v1.6-vicuna-7b"
QUESTION = ("Describe this picture in detail: its colours, its shapes, what "
            "stands out, and anything written in it. " * 4)


def _chat(port, seed, budget=None, max_tokens=16):
    image = {"type": "image_url", "image_url": {"url": image_data_url(seed)}}
    body = {"model": "llava", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [
                image, {"type": "text", "text": QUESTION}]}]}
    if budget is not None:
        body["vllm_xargs"] = {"sparsemm_budget": budget}
    return post(f"http://127.0.0.1:{port}/v1/chat/completions", body)


def _check_budgets(port, settings, record):
    """Budgets 64 and 512 from vllm_xargs: each request's kept tokens and
    freed blocks on /metrics equal its plan."""
    from vllm_sparsemm.tools.plan_report import plan_report
    before = settled_metrics(port)
    done = before.get("vllm:sparsemm_requests_compressed_total", 0)
    for seed, budget in ((11, 64), (12, 512)):
        reply = _chat(port, seed, budget=budget)
        prompt_len = reply["usage"]["prompt_tokens"]
        done += 1
        after = after_compressions(port, done)
        plan = plan_report(SCORES, budget, prompt_len,
                           block_size=settings["block_size"],
                           window=settings["window"], ratio=settings["ratio"])
        assert plan["compressed"], (budget, prompt_len)
        grew = compression_since(before, after)
        kept, freed = grew["kept"], grew["freed"]
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
            post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
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


def _serve_llava(tmp_path, *args, tag=""):
    """``vllm serve`` of a dummy LLaVA-1.5-7B folder under sparsemm, B=128;
    its log is ``SPARSEMM_SERVE_LOG`` with ``tag`` added to the name."""
    from vllm_sparsemm.testing.checkpoints import write_dummy_llava_15_7b
    model = write_dummy_llava_15_7b(tmp_path / "llava-1.5-7b")
    return served(model, "--load-format", "dummy",
                  "--attention-backend", "sparsemm", "--additional-config",
                  '{"sparsemm": {"budget": 128, "head_scores": '
                  '"llava-v1.6-vicuna-7b"}}',
                  "--max-model-len", "4096", *fixed_pool(SEVEN_B_POOL),
                  "--served-model-name", "llava", *args,
                  log_path=serve_log(tmp_path, tag))


def test_serve_chat_completion_with_image(tmp_path):
    with _serve_llava(tmp_path) as server:
        log_path = server.log_path
        port = server.port
        reply = post(f"{server.url}/v1/chat/completions", {
            "model": "llava", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(0)}},
                {"type": "text", "text": "What is in this picture?"}]}]})
        choice = reply["choices"][0]
        assert reply["usage"]["prompt_tokens"] > 576  # the image is in the prompt
        assert reply["usage"]["completion_tokens"] == 16
        assert isinstance(choice["message"]["content"], str)
        # sparsemm served it, not a silent fallback to stock attention: it
        # compressed the prompt, with prefix caching on (vLLM's default)
        text = server.log_text()
        assert "prefix_caching=on" in text
        assert "sparsemm: compressing prompts" in text
        assert not late_sparsemm_builds(text)  # built in vLLM's warm-up

        for args in ((), ("--stream", "--budget", "64")):
            done = _client_example(port, *args)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip()
        refused = _client_example(port, "--budget", "-5")
        assert refused.returncode == 2 and "(400)" in refused.stderr
        budgets = {}
        _check_budgets(port, logged_settings(text), budgets)
        _check_bad_budgets(port)
        lines = [line for line in urllib.request.urlopen(
            f"{server.url}/metrics", timeout=10).read().decode()
            .splitlines() if line.startswith("vllm:sparsemm_")]
        Path(log_path).with_suffix(".metrics.txt").write_text(
            "\n".join(lines) + "\n" + json.dumps(budgets) + "\n")
        assert any(line.startswith("vllm:sparsemm_compaction_seconds_count")
                   for line in lines)


def test_metrics_from_several_api_servers(tmp_path):
    """With ``--api-server-count 2`` vLLM serves ``/metrics`` from a fresh
    multiprocess registry in each API server; sparsemm's metrics must be in
    it (``patches.patch_metrics_registry``), each family once, with the same
    counts whichever server answers the scrape."""
    with _serve_llava(tmp_path, "--api-server-count", "2",
                      tag="_api2") as server:
        for seed in range(3):
            _chat(server.port, 20 + seed)
        counted = after_compressions(server.port, 3)
        scrapes = [urllib.request.urlopen(f"{server.url}/metrics", timeout=10)
                   .read().decode() for _ in range(8)]
        for text in scrapes:
            families = [line.split()[2] for line in text.splitlines()
                        if line.startswith("# TYPE vllm:sparsemm_")]
            assert families, "no sparsemm metric on /metrics"
            assert len(families) == len(set(families)), families
        compressed = {sparsemm_metrics(server.port)[
            "vllm:sparsemm_requests_compressed_total"] for _ in range(8)}
        print(f"served: 2 API servers: {len(families)} sparsemm families, "
              f"requests compressed {sorted(compressed)}")
        assert compressed == {counted["vllm:sparsemm_requests_compressed_total"]}
