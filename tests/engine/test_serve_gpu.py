"""`vllm serve` with the sparsemm backend answers an OpenAI chat completion with an image.

A LLaVA-1.5-7B-shaped model (real config, dummy weights) in vLLM's default
compile mode; the authors' Vicuna-7B head scores fit its 32 x 32 heads.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

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


def test_serve_chat_completion_with_image(tmp_path):
    from PIL import Image

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
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255)
                        .astype(np.uint8)).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
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
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
