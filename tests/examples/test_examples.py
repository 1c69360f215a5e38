"""The user examples: each runs as written. On the CPU: arguments, the requests
they build, the serve line against vLLM's own parser, what vLLM makes of the
video example's prompts, and their one-line messages without a GPU or a
server. On a GPU (``-m gpu``): they run."""

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from scripts import EXAMPLES, ROOT, load_script


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


def _run_example(tmp_path, script, *args, timeout=420):
    """Run an example to its end, its output in files under ``tmp_path``
    (readable while it runs); fail with their tails if it fails or hangs."""
    out, err = tmp_path / f"{script}.out", tmp_path / f"{script}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        try:
            code = subprocess.run([sys.executable, str(EXAMPLES / script),
                                   *args], stdout=stdout, stderr=stderr,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"no exit in {timeout} s"
    done = types.SimpleNamespace(stdout=out.read_text(),
                                 stderr=err.read_text())
    assert code == 0, (f"{script}: {code}\n" + done.stdout[-2000:] +
                       done.stderr[-3000:])
    return done


@pytest.mark.gpu
def test_offline_example_runs_on_a_tiny_model(tmp_path):
    from vllm_sparsemm.testing.checkpoints import save_tiny_llava
    model = save_tiny_llava(tmp_path / "llava", seed=1, num_layers=4,
                            num_heads=4, num_kv_heads=4, head_dim=64,
                            image_size=336)
    done = _run_example(tmp_path, "offline_inference.py", "--model",
                        str(model), "--head-scores", "uniform", "--budget",
                        "64", "--request-budget", "off", "--max-tokens", "8")
    assert [l[:3] for l in done.stdout.splitlines() if l.startswith("[")] == [
        "[0]", "[1]", "[2]"]


def test_video_chat_sends_a_video_url_its_fps_and_a_budget(tmp_path):
    import cv2
    video = load_script("video_chat")
    clip = video.write_clip(tmp_path / "clip.mp4")
    capture = cv2.VideoCapture(clip)
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 16
    assert capture.get(cv2.CAP_PROP_FPS) == 8
    capture.release()
    args = video.parse_args(["--base-url", "http://127.0.0.1:8000/v1",
                             "--video", clip, "--request-budget", "64"])
    chat = video.messages(args.video, args.question, args.fps,
                          args.max_pixels)
    assert chat[0]["content"][0] == {"type": "video", "video": clip,
                                     "max_pixels": 360 * 420, "fps": 2.0}
    request = video.chat_request("m", chat, 32, args.request_budget)
    part, text = request["messages"][0]["content"]
    url = part["video_url"]["url"]
    assert part["type"] == "video_url"
    assert url.startswith("data:video/mp4;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == Path(clip).read_bytes()
    assert text == {"type": "text", "text": "Describe this video."}
    assert request["max_tokens"] == 32 and request["temperature"] == 0
    assert request["extra_body"] == {
        "media_io_kwargs": {"video": {"fps": 2.0}},
        "vllm_xargs": {"sparsemm_budget": 64}}
    for given in ("https://example.com/a.mp4", "file:///data/a.mp4"):
        assert video.video_part(given)["video_url"]["url"] == given
    off = video.chat_request("m", chat, 8, "off")
    assert off["extra_body"]["vllm_xargs"] == {"sparsemm_budget": "off"}
    assert "vllm_xargs" not in video.chat_request("m", chat, 8,
                                                  None)["extra_body"]


def test_video_chat_builds_the_offline_engine_and_budget(monkeypatch):
    from vllm_sparsemm.engine import patches
    # as in a fresh process: no engine has set the request window yet
    monkeypatch.setattr(patches, "_request_window", None)
    video = load_script("video_chat")
    args = video.parse_args(["--model", "m", "--request-budget", "off"])
    kwargs = video.engine_kwargs(args)
    assert kwargs["attention_backend"] == "sparsemm"
    assert kwargs["additional_config"] == {"sparsemm": {"budget": 256}}
    assert kwargs["limit_mm_per_prompt"] == {"image": 0, "video": 1}
    assert video.sampling(args).extra_args == {"sparsemm_budget": "off"}
    default = video.parse_args(["--model", "m"])
    assert video.sampling(default).extra_args is None
    for wrong in ([], ["--model", "m", "--base-url", "http://h/v1"]):
        with pytest.raises(SystemExit):
            video.parse_args(wrong)


def test_video_chat_says_in_one_line_what_it_lacks(monkeypatch, capsys):
    """No GPU, no qwen-vl-utils (offline), no server: one line each."""
    video = load_script("video_chat")
    if not __import__("torch").cuda.is_available():
        assert video.main(["--model", "m"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs an NVIDIA GPU" in err
    from vllm import platforms
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "decord")
    monkeypatch.setattr(platforms, "current_platform",
                        types.SimpleNamespace(is_cuda=lambda: True))
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", None)
    assert video.main(["--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vllm-sparsemm[qwen]" in err
    assert video.main(["--base-url", "http://127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no server at" in err


def _reads_videos() -> str | None:
    """Why qwen-vl-utils cannot read an mp4 here, or None."""
    if importlib.util.find_spec("qwen_vl_utils") is None:
        return "qwen-vl-utils is not installed (the qwen and test extras)"
    if importlib.util.find_spec("decord") is None:
        return ("decord is not installed: qwen-vl-utils' other readers need "
                "FFmpeg's shared libraries or an older torchvision")
    return None


def _rendered(folder: str, clip: str) -> dict:
    """The video example's offline prompt and server request as vLLM
    renders them for the engine, on the CPU: run in a fresh process, since
    vLLM's CPU platform sets environment variables."""
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform
    platforms.current_platform = CpuPlatform()
    video = load_script("video_chat")
    video.prefer_decord()
    from transformers import AutoProcessor
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.params import ChatParams
    from vllm.renderers.registry import renderer_from_config

    from vllm_sparsemm.testing.tiny import QWEN_VIDEO_TOKEN
    chat = video.messages(clip, "What happens?", 4.0, 360 * 420)
    processor = AutoProcessor.from_pretrained(folder)
    prompt = video.offline_prompt(processor, chat)
    frames, metadata = prompt["multi_modal_data"]["video"][0]
    model = ModelConfig(model=folder, mm_processor_cache_gb=0,
                        limit_mm_per_prompt={"image": 0, "video": 1})
    renderer = renderer_from_config(VllmConfig(model_config=model))
    request = video.chat_request("m", chat, 8, "64")
    params = ChatParams(media_io_kwargs=request["extra_body"][
        "media_io_kwargs"])
    served = renderer.render_chat([request["messages"]], params)[1][0]

    def seen(engine_input):
        items = engine_input["mm_kwargs"]["video"]
        return {"grids": [item["video_grid_thw"].data.tolist()
                          for item in items],
                "tokens": engine_input["prompt_token_ids"].count(
                    QWEN_VIDEO_TOKEN)}
    return {"keys": sorted(prompt["multi_modal_data"]),
            "kwargs": prompt["mm_processor_kwargs"],
            "frames": list(frames.shape),
            "patch": processor.image_processor.patch_size,
            "metadata": {key: metadata[key] for key in
                         ("fps", "total_num_frames", "frames_indices")},
            "offline": seen(renderer.render_cmpl([prompt])[0]),
            "served": seen(served)}


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.5", "3"])
def test_video_chat_prompts_are_what_vllm_takes(tmp_path, version):
    """qwen-vl-utils' frames go to vLLM with their metadata and frame
    sampling off; offline and through the server, a tiny Qwen2.5-VL or
    Qwen3-VL gets as many frames a second, and a placeholder per video
    token."""
    reason = _reads_videos()
    if reason:
        pytest.skip(reason)
    from vllm_sparsemm.testing.checkpoints import save_tiny_qwen2_vl
    folder = save_tiny_qwen2_vl(tmp_path / "model", version=version,
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=64)
    clip = load_script("video_chat").write_clip(tmp_path / "clip.mp4")
    code = ("import json, sys; sys.path[:0] = ['tests/examples', 'tests']; "
            "import test_examples as t; "
            "print('RESULT' + json.dumps(t._rendered(*sys.argv[1:])))")
    done = subprocess.run([sys.executable, "-c", code, str(folder), clip],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
    assert lines, done.stdout[-3000:] + done.stderr[-5000:]
    seen = json.loads(lines[-1][len("RESULT"):])
    assert seen["keys"] == ["video"]
    assert seen["kwargs"] == {"do_sample_frames": False}
    count, channels, height, width = seen["frames"]
    assert (count, channels) == (8, 3)
    factor = 2 * seen["patch"]  # a merged patch of the processor
    assert height % factor == 0 and width % factor == 0
    assert height * width <= 360 * 420
    assert seen["metadata"]["fps"] == 8 and len(
        seen["metadata"]["frames_indices"]) == 8
    assert seen["metadata"]["total_num_frames"] == 16
    for route in ("offline", "served"):
        (grid,) = seen[route]["grids"]
        # a temporal patch holds a pair of frames
        assert grid[0] == count // 2, route
        assert seen[route]["tokens"] == grid[0] * grid[1] * grid[2] // 4


@pytest.mark.slow
def test_video_chat_reads_the_video_in_a_process_of_its_own(tmp_path):
    """Offline, the example reads the video in a spawned process: decord
    never enters the process that forks vLLM's engine core."""
    reason = _reads_videos()
    if reason:
        pytest.skip(reason)
    from vllm_sparsemm.testing.checkpoints import save_tiny_qwen2_vl
    folder = save_tiny_qwen2_vl(tmp_path / "model", version="2.5",
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=64)
    code = ("import sys; sys.path.insert(0, 'examples'); import video_chat "
            "as v; v.prefer_decord(); chat = v.messages(sys.argv[2], 'Why?', "
            "4.0, 360 * 420); p = v.prompt_apart(sys.argv[1], chat); "
            "frames, _ = p['multi_modal_data']['video'][0]; "
            "print('RESULT', list(frames.shape), 'decord' in sys.modules)")
    clip = load_script("video_chat").write_clip(tmp_path / "clip.mp4")
    done = subprocess.run([sys.executable, "-c", code, str(folder), clip],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert "RESULT [8, 3," in done.stdout, (done.stdout[-2000:] +
                                           done.stderr[-3000:])
    assert done.stdout.rstrip().endswith("False")  # decord stayed out


@pytest.mark.slow
def test_video_chat_says_in_one_line_that_it_cannot_make_the_prompt(
        tmp_path):
    """A model folder without a processor, offline: one line, exit 2,
    whatever the spawned reader process raised."""
    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.skip("qwen-vl-utils is not installed (qwen and test extras)")
    code = ("import sys, types; sys.path.insert(0, 'examples'); "
            "from vllm import platforms; platforms.current_platform = "
            "types.SimpleNamespace(is_cuda=lambda: True); import video_chat; "
            "sys.exit(video_chat.main(['--model', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("video_chat.py: could not make a prompt of "), last


@pytest.mark.gpu
def test_video_chat_runs_offline_on_a_tiny_qwen2_5_vl(tmp_path):
    reason = _reads_videos()
    if reason:
        pytest.skip(reason)
    from vllm_sparsemm.testing.checkpoints import save_tiny_qwen2_vl
    model = save_tiny_qwen2_vl(tmp_path / "qwen2.5-vl", seed=1,
                               version="2.5", num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=64)
    done = _run_example(tmp_path, "video_chat.py", "--model", str(model),
                        "--head-scores", "uniform", "--budget", "64",
                        "--request-budget", "48", "--max-model-len", "2048",
                        "--max-tokens", "8")
    # vLLM logs to stdout too, at shutdown as well: find the example's line
    counts = re.search(r"^prompt (\d+) tokens, (\d+) generated$",
                       done.stdout, re.M)
    assert counts, done.stdout[-1000:]
    assert int(counts[1]) > 64  # the video is in the prompt, compressed


# each model the README and the examples serve: its dummy-weight folder
DOCUMENTED_MODELS = {
    "llava-hf/llava-v1.6-vicuna-7b-hf": "write_dummy_llava_next_7b",
    "/tmp/models/llava-1.5-7b": "write_dummy_llava_15_7b",
    "Qwen/Qwen2.5-VL-7B-Instruct": "write_dummy_qwen2_5_vl_7b",
}
_SERVED = re.compile(r"(?:vllm serve|serve\.sh|--model|LLM\()\s*\"?"
                     r"([\w.-]*/[\w./-]+)")
_SCORES = re.compile(r"VLLM_SPARSEMM_HEAD_SCORES=(\S+)|--head-scores (\S+)|"
                     r"\"head_scores\": \"([^\"]+)\"")


def _documented_commands():
    """(file, model, head_scores or None) of each command the docs write."""
    for path in [ROOT / "README.md", *sorted(EXAMPLES.iterdir())]:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # one line a command
        for line in text.splitlines():
            for served in _SERVED.finditer(line):
                scores = _SCORES.search(line)
                yield path.name, served[1], scores and next(
                    group for group in scores.groups() if group)


def test_each_documented_command_finds_its_head_scores(tmp_path):
    """A model with no shipped score file fails at start-up unless told
    which to use: every command the README and the examples write for one
    says it, and the others' shipped file is found."""
    from vllm.config import ModelConfig

    from vllm_sparsemm.engine.config import (ModelShape, SparseMMSettings,
                                             resolve_scores)
    from vllm_sparsemm.testing import checkpoints
    commands = list(_documented_commands())
    assert {model for _, model, _ in commands} == set(DOCUMENTED_MODELS)
    folders = {}
    for where, model, head_scores in commands:
        if model not in folders:
            writer = DOCUMENTED_MODELS[model]
            folders[model] = ModelConfig(model=str(getattr(
                checkpoints, writer)(tmp_path / writer)))
        config = folders[model]
        shape = ModelShape.from_hf_text_config(config.architectures,
                                               config.hf_text_config)
        settings = (SparseMMSettings(head_scores=head_scores) if head_scores
                    else SparseMMSettings())
        scores, _ = resolve_scores(settings, shape)  # raises if none fits
        assert scores.shape[0] == config.hf_text_config.num_hidden_layers, (
            where, model)
