"""The user examples: each runs as written. On the CPU: arguments, the requests
they build, the serve line against vLLM's own parser, and their one-line
messages without a GPU or a server. On a GPU (``-m gpu``): they run."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from scripts import EXAMPLES, load_script


def _serve_line(*extra):
    done = subprocess.run(["bash", str(EXAMPLES / "serve.sh"), "m", *extra],
                          env=dict(os.environ, SPARSEMM_PRINT_ONLY="1"),
                          capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_serve_line_parses_with_vllm_and_selects_sparsemm(vllm_parsers):
    serve_parser, _ = vllm_parsers
    command = _serve_line("--max-model-len", "4096")
    assert command[:2] == ["vllm", "serve"]
    args = serve_parser.parse_args(command[2:])
    assert args.model_tag == "m" and args.attention_backend == "sparsemm"
    assert args.max_model_len == 4096
    from vllm_sparsemm.engine.config import SparseMMSettings
    settings = SparseMMSettings.from_sources(args.additional_config)
    assert (settings.budget, settings.window, settings.ratio) == (256, 32, 0.1)


def test_serve_says_in_one_line_that_it_needs_a_gpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run(["bash", str(EXAMPLES / "serve.sh"), "m"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "needs an NVIDIA GPU" in done.stderr
    help_text = subprocess.run(["bash", str(EXAMPLES / "serve.sh"), "--help"],
                               capture_output=True, text=True).stdout
    assert "sparsemm_budget" in help_text and "head_scores" in help_text


def test_client_builds_url_and_base64_images_and_a_budget(tmp_path):
    client = load_script("openai_client")
    by_url = client.image_part(url="https://example.com/cat.png")
    assert by_url["image_url"]["url"] == "https://example.com/cat.png"
    inline = client.image_part()
    assert inline["image_url"]["url"].startswith("data:image/png;base64,")
    request = client.chat_request("m", "what?", inline, 32, True, "128")
    assert request["stream"] is True and request["max_tokens"] == 32
    assert request["extra_body"] == {"vllm_xargs": {"sparsemm_budget": 128}}
    assert request["messages"][0]["content"][0] is inline
    off = client.chat_request("m", "what?", inline, 32, False, "off")
    assert off["extra_body"]["vllm_xargs"] == {"sparsemm_budget": "off"}
    assert "extra_body" not in client.chat_request("m", "q", inline, 8,
                                                   False, None)


def test_client_says_in_one_line_that_no_server_answers(capsys):
    client = load_script("openai_client")
    assert client.main(["--base-url", "http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no server at" in err


class _Refusing(BaseHTTPRequestHandler):
    """A server that lists one model and refuses every chat with a 400, as
    vLLM does for a bad sparsemm_budget."""

    def do_GET(self):
        self._send(200, {"object": "list", "data": [
            {"id": "m", "object": "model", "created": 0, "owned_by": "x"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(400, {"error": {"message": "sparsemm_budget must be an "
                                   "integer above the window (32)",
                                   "type": "BadRequestError", "code": 400}})

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_client_shows_a_refusal_in_one_line(capsys):
    client = load_script("openai_client")
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = client.main(["--base-url",
                            f"http://127.0.0.1:{server.server_port}/v1",
                            "--budget", "-5"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "(400)" in err and "sparsemm_budget must be" in err


def test_offline_example_builds_a_batch_with_images(monkeypatch):
    from vllm_sparsemm.engine import patches
    # as in a fresh process: no engine has set the request window yet
    monkeypatch.setattr(patches, "_request_window", None)
    offline = load_script("offline_inference")
    args = offline.parse_args(["--model", "m", "--request-budget", "off"])
    batch = offline.conversations(offline.images([]), args.question)
    assert len(batch) == 3
    assert batch[0][0]["content"][0]["type"] == "image_pil"
    kwargs = offline.engine_kwargs(args)
    assert kwargs["attention_backend"] == "sparsemm"
    assert kwargs["additional_config"] == {"sparsemm": {"budget": 256}}
    params = offline.sampling(args, 3)
    assert params[0].extra_args == {"sparsemm_budget": "off"}
    assert params[1].extra_args is None


def test_offline_example_says_in_one_line_that_it_needs_a_gpu(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    offline = load_script("offline_inference")
    assert offline.main(["--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an NVIDIA GPU" in err


@pytest.mark.gpu
def test_offline_example_runs_on_a_tiny_model(tmp_path):
    from vllm_sparsemm.testing.checkpoints import save_tiny_llava
    model = save_tiny_llava(tmp_path / "llava", seed=1, num_layers=4,
                            num_heads=4, num_kv_heads=4, head_dim=64,
                            image_size=336)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "offline_inference.py"), "--model",
         str(model), "--head-scores", "uniform", "--budget", "64",
         "--request-budget", "off", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [l[:3] for l in done.stdout.splitlines() if l.startswith("[")] == [
        "[0]", "[1]", "[2]"]
