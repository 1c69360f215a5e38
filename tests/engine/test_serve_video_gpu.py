"""`vllm serve` of a tiny Qwen2.5-VL answering video chats (``video_url``).

Each chat mixes a video, sent as a base64 data URL or as a file URL under
``--allowed-local-media-path``, and an image, and is prefilled in chunks
(``--max-num-batched-tokens`` below its length). With the server's budget
above every prompt the greedy tokens are stock FLASH_ATTN's: the two servers
run in turn on the same folder. A chat with its own small budget
(``vllm_xargs``) is compressed as ``vllm-sparsemm plan`` says, on
``/metrics``, and examples/video_chat.py asks the sparsemm server too.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts import EXAMPLES, load_script
from serving import (after_compressions, compression_since, fixed_pool,
                     image_data_url, logged_settings, post, served,
                     settled_metrics)

CHUNK = 64  # prompt tokens a step: every chat below is longer
BUDGET = 48  # the compressed chat's own budget
MAX_TOKENS = 24
QUESTION = ("What happens in this video, and how does the picture relate "
            "to it? Name the colours and the motion you see. " * 3)


def _serve_args(backend: str, media: Path) -> list[str]:
    """The same engine for both backends: a fixed KV pool, eager mode,
    small prefill chunks; sparsemm with a budget above every prompt."""
    args = ["--dtype", "float16", "--max-model-len", "2048",
            "--enforce-eager", "--seed", "0",
            "--max-num-batched-tokens", str(CHUNK), "--max-num-seqs", "16",
            *fixed_pool(1 << 30),
            "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 1}),
            "--allowed-local-media-path", str(media),
            "--served-model-name", "qwen", "--attention-backend", backend]
    if backend == "sparsemm":
        args += ["--additional-config", json.dumps({"sparsemm": {
            "budget": 4096, "window": 16, "head_scores": "uniform"}})]
    return args


def test_serve_lines_parse_with_vllm(vllm_parsers, tmp_path):
    serve_parser, _ = vllm_parsers
    for backend in ("FLASH_ATTN", "sparsemm"):
        args = serve_parser.parse_args(["m", *_serve_args(backend, tmp_path)])
        assert args.attention_backend == backend
        assert args.max_num_batched_tokens == CHUNK
        assert args.kv_cache_memory_bytes == 1 << 30
        assert args.allowed_local_media_path == str(tmp_path)
        assert args.limit_mm_per_prompt == {"image": 1, "video": 1}


def _chat(content: list[dict], **extra) -> dict:
    return {"model": "qwen", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
            "messages": [{"role": "user", "content": content}], **extra}


def _chats(media: Path) -> list[dict]:
    """An image then a video inline; a video by file URL then an image;
    the first again with another image and its own small budget."""
    video = load_script("video_chat")
    inline = video.video_part(video.write_clip(media / "clip0.mp4", seed=0))
    local = Path(video.write_clip(media / "clip1.mp4", seed=1))
    by_file = {"type": "video_url", "video_url": {"url": local.as_uri()}}
    text = {"type": "text", "text": QUESTION}

    def image(seed):
        return {"type": "image_url",
                "image_url": {"url": image_data_url(seed, (252, 196))}}
    return [_chat([image(0), inline, text]), _chat([by_file, image(1), text]),
            _chat([image(2), inline, text],
                  vllm_xargs={"sparsemm_budget": BUDGET})]


def _answer(server, chat) -> dict:
    reply = post(f"{server.url}/v1/chat/completions", chat)
    prompt, tokens = reply["prompt_token_ids"], reply["choices"][0][
        "token_ids"]
    assert prompt and tokens, "no token ids in the reply"
    assert len(prompt) > CHUNK  # prefilled in chunks
    return {"prompt": prompt, "tokens": tokens}


def _check_compression(server, model, chat):
    """Nothing compressed so far (B >= N); the chat with its own budget is
    compressed, its kept tokens and freed blocks those of its plan."""
    from vllm_sparsemm.tools.plan_report import plan_report
    before = settled_metrics(server.port)
    assert before.get("vllm:sparsemm_requests_compressed_total", 0) == 0
    prompt_len = len(_answer(server, chat)["prompt"])
    grew = compression_since(before, after_compressions(server.port, 1))
    settings = logged_settings(server.log_text())
    plan = plan_report(str(model), BUDGET, prompt_len,
                       block_size=settings["block_size"],
                       window=settings["window"], ratio=settings["ratio"],
                       head_scores="uniform")
    print(f"served: video chat with budget {BUDGET}: prompt {prompt_len} "
          f"tokens, kept {grew['kept']:.1f} per head, blocks freed "
          f"{grew['freed']:.0f} of {plan['full_blocks']}")
    assert plan["compressed"]
    assert grew["requests"] == 1 and grew["full"] == prompt_len
    assert grew["kept"] == pytest.approx(float(np.mean(plan["kept"])),
                                         abs=1e-3)
    assert plan["full_blocks"] - grew["freed"] == plan["compressed_blocks"]


def _check_example(server, clip):
    """examples/video_chat.py against the server, as its docstring says."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "video_chat.py"), "--base-url",
         f"{server.url}/v1", "--video", clip, "--request-budget",
         str(BUDGET), "--max-tokens", "8"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prompt_tokens" in done.stdout
    after_compressions(server.port, 2)


@pytest.mark.gpu
def test_served_video_chats_are_stocks_and_compress_on_request(tmp_path):
    from vllm_sparsemm.testing.checkpoints import save_tiny_qwen2_vl
    model = save_tiny_qwen2_vl(tmp_path / "qwen2.5-vl", seed=1,
                               version="2.5", num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=64)
    media = tmp_path / "media"
    media.mkdir()
    chats = _chats(media)
    answers = {}
    for backend in ("FLASH_ATTN", "sparsemm"):
        with served(model, *_serve_args(backend, media),
                    log_path=tmp_path / f"serve_{backend}.log") as server:
            answers[backend] = [_answer(server, chat) for chat in chats[:2]]
            if backend == "sparsemm":
                _check_compression(server, model, chats[2])
                _check_example(server, str(media / "clip0.mp4"))
    for i, (want, got) in enumerate(zip(answers["FLASH_ATTN"],
                                        answers["sparsemm"])):
        print(f"served: video chat {i}: prompt {len(want['prompt'])} tokens")
        assert got["prompt"] == want["prompt"], i
        assert got["tokens"] == want["tokens"], i
