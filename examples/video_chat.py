"""Ask about a video under the sparsemm backend, offline or through a server.

    pip install --no-build-isolation ".[qwen]"   # qwen-vl-utils and decord
    python examples/video_chat.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --video clip.mp4 --budget 256 --head-scores uniform
    VLLM_SPARSEMM_HEAD_SCORES=uniform \
        bash examples/serve.sh Qwen/Qwen2.5-VL-7B-Instruct  # in another shell
    python examples/video_chat.py --base-url http://127.0.0.1:8000/v1 \
        --video clip.mp4 --request-budget 128

The chat is written as Qwen's docs write it, a ``video`` part with ``fps``
and ``max_pixels``. Offline (``--model``, Qwen2-VL, Qwen2.5-VL or Qwen3-VL;
needs an NVIDIA GPU, sm_80 or sm_90) qwen-vl-utils reads the video, and
vLLM gets its frames with their metadata. Through a server (``--base-url``)
the video goes as a ``video_url`` (a URL as given, a local file as a base64
data URL) and vLLM reads it, sampling ``--fps`` frames a second. ``--video``
is a file or an http(s) or file URL; without it a short random clip is
written. ``--request-budget`` gives the request its own SparseMM budget
(``off``: none), as ``vllm_xargs`` does through the server.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import importlib.util
import mimetypes
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

URL_SCHEMES = ("http://", "https://", "file://", "data:")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="offline: a model folder or Hugging "
                       "Face id")
    where.add_argument("--base-url", help="a running server's OpenAI URL, "
                       "e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--video", help="a video file or URL; if none, a "
                        "short random clip")
    parser.add_argument("--question", default="Describe this video.",
                        help="what to ask")
    parser.add_argument("--fps", type=float, default=2.0,
                        help="frames a second sampled from the video")
    parser.add_argument("--max-pixels", type=int, default=360 * 420,
                        help="offline: pixels per frame at most")
    parser.add_argument("--budget", type=int, default=256,
                        help="offline: the engine's SparseMM budget")
    parser.add_argument("--request-budget", default=None,
                        help="this request's own budget, or off")
    parser.add_argument("--head-scores", default=None,
                        help="offline: score file, shipped name or uniform; "
                        "if none, the shipped file of the model's shape")
    parser.add_argument("--load-format", default="auto",
                        help="offline: dummy for random weights")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="offline: the engine's context length")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="tokens to generate at most")
    return parser.parse_args(argv)


def write_clip(path, frames: int = 16, size=(224, 168), fps: float = 8.0,
               seed: int = 0) -> str:
    """A short clip of random frames, as mp4."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                             size)
    for _ in range(frames):
        writer.write((rng.random((size[1], size[0], 3)) * 255).astype(
            np.uint8))
    writer.release()
    return str(path)


def messages(video: str, question: str, fps: float,
             max_pixels: int) -> list[dict]:
    """The chat as Qwen's docs write it for qwen-vl-utils."""
    return [{"role": "user", "content": [
        {"type": "video", "video": video, "max_pixels": max_pixels,
         "fps": fps},
        {"type": "text", "text": question}]}]


def budget_value(text: str | None):
    """``--request-budget`` as ``sparsemm_budget`` takes it, or None."""
    if text is None:
        return None
    return text if text == "off" else int(text)


# offline: qwen-vl-utils reads the video, vLLM's engine runs in this process

def prefer_decord() -> None:
    """qwen-vl-utils reads videos with torchcodec whenever it is installed
    (vLLM installs it), and torchcodec loads FFmpeg's shared libraries,
    which many machines lack; decord brings its own. So decord when it is
    there (a FORCE_QWENVL_VIDEO_READER already set wins). qwen-vl-utils
    reads the variable when imported: call this first."""
    if importlib.util.find_spec("decord") is not None:
        os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")


def vision_inputs(chat: list[dict], patch_size: int) -> tuple[dict, dict]:
    """``multi_modal_data`` and ``mm_processor_kwargs`` from qwen-vl-utils,
    as vLLM takes them: each video as a (frames, metadata) pair, which
    Qwen3-VL needs for its timestamps, and ``do_sample_frames`` off, the
    frames being sampled already. (qwen-vl-utils' other form, ``fps`` as a
    list in the kwargs, is refused by the transformers processors vLLM
    runs.)"""
    from qwen_vl_utils import process_vision_info
    images, videos, video_kwargs = process_vision_info(
        chat, return_video_kwargs=True, return_video_metadata=True,
        image_patch_size=patch_size)
    data = {}
    if images:
        data["image"] = images
    if videos:
        data["video"] = videos
    return data, video_kwargs


def offline_prompt(processor, chat: list[dict]) -> dict:
    """The prompt ``LLM.generate`` takes: the chat template's text and the
    video qwen-vl-utils read."""
    data, kwargs = vision_inputs(chat, processor.image_processor.patch_size)
    text = processor.apply_chat_template(chat, tokenize=False,
                                         add_generation_prompt=True)
    return {"prompt": text, "multi_modal_data": data,
            "mm_processor_kwargs": kwargs}


def _prompt_from_folder(model: str, chat: list[dict]) -> dict:
    from transformers import AutoProcessor
    return offline_prompt(AutoProcessor.from_pretrained(model), chat)


def prompt_apart(model: str, chat: list[dict]) -> dict:
    """``offline_prompt``, read in a process of its own. decord, which
    qwen-vl-utils reads with where torchcodec finds no FFmpeg, replaces a
    C++ runtime hook (``__cxa_thread_atexit``) in every process that loads
    it, and breaks a process that later starts CUDA (dmlc/decord#293):
    vLLM's engine core, forked from a process that had read a video, hung
    at start-up. Read in a spawned process, decord never enters this one
    nor the engine's."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_prompt_from_folder, model, chat).result()


def engine_kwargs(args) -> dict:
    settings = {"budget": args.budget}
    if args.head_scores:
        settings["head_scores"] = args.head_scores
    return dict(model=args.model, attention_backend="sparsemm",
                additional_config={"sparsemm": settings},
                load_format=args.load_format, max_model_len=args.max_model_len,
                limit_mm_per_prompt={"image": 0, "video": 1})


def sampling(args):
    """Greedy parameters, with the request's own budget if asked."""
    from vllm import SamplingParams
    budget = budget_value(args.request_budget)
    return SamplingParams(
        temperature=0, max_tokens=args.max_tokens,
        extra_args=None if budget is None else {"sparsemm_budget": budget})


def run_offline(args, video: str) -> int:
    # vLLM's platform check asks NVML: torch.cuda here would initialise CUDA
    # in this process, and the engine core vLLM forks could not use it
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        print("video_chat.py: vLLM with sparsemm needs an NVIDIA GPU (CUDA); "
              "none is visible here", file=sys.stderr)
        return 2
    prefer_decord()
    try:
        import qwen_vl_utils  # noqa: F401
    except ImportError:
        print("video_chat.py: offline it reads the video with qwen-vl-utils: "
              "pip install \"vllm-sparsemm[qwen]\"", file=sys.stderr)
        return 2
    chat = messages(video, args.question, args.fps, args.max_pixels)
    try:
        prompt = prompt_apart(args.model, chat)
    except Exception as e:  # the processor or the video reader: one line
        print(f"video_chat.py: could not make a prompt of {video} with "
              f"{args.model}'s processor: {type(e).__name__}: {e}"
              .splitlines()[0], file=sys.stderr)
        return 2
    from vllm import LLM
    llm = LLM(**engine_kwargs(args))
    out = llm.generate(prompt, sampling(args))[0]
    print(out.outputs[0].text)
    print(f"prompt {len(out.prompt_token_ids)} tokens, "
          f"{len(out.outputs[0].token_ids)} generated")
    return 0


# through a server: the video goes as a video_url, vLLM reads it

def video_part(video: str) -> dict:
    """An OpenAI ``video_url`` part: a URL as given, a local file inline as
    a base64 data URL."""
    url = video
    if not video.startswith(URL_SCHEMES):
        mime = mimetypes.guess_type(video)[0] or "video/mp4"
        url = f"data:{mime};base64," + base64.b64encode(
            Path(video).read_bytes()).decode()
    return {"type": "video_url", "video_url": {"url": url}}


def chat_request(model: str, chat: list[dict], max_tokens: int,
                 budget: str | None) -> dict:
    """The keyword arguments of ``client.chat.completions.create``: the
    Qwen-style chat with its video parts as ``video_url`` parts, the
    server's video reader asked for the same frames a second."""
    parts, fps = [], None
    for part in chat[0]["content"]:
        if part["type"] == "video":
            parts.append(video_part(part["video"]))
            fps = part.get("fps", fps)
        else:
            parts.append(part)
    extra = {}
    if fps is not None:
        extra["media_io_kwargs"] = {"video": {"fps": fps}}
    value = budget_value(budget)
    if value is not None:  # this request's own budget (vLLM's vllm_xargs)
        extra["vllm_xargs"] = {"sparsemm_budget": value}
    request = {"model": model, "max_tokens": max_tokens, "temperature": 0,
               "messages": [{"role": "user", "content": parts}]}
    if extra:
        request["extra_body"] = extra
    return request


def ask_server(args, video: str) -> int:
    import openai
    client = openai.OpenAI(base_url=args.base_url, api_key="none")
    try:
        model = client.models.list().data[0].id
        chat = messages(video, args.question, args.fps, args.max_pixels)
        reply = client.chat.completions.create(**chat_request(
            model, chat, args.max_tokens, args.request_budget))
        print(reply.choices[0].message.content)
        print(reply.usage)
    except openai.APIConnectionError:
        print(f"video_chat.py: no server at {args.base_url}: start one with "
              f"`bash examples/serve.sh MODEL`", file=sys.stderr)
        return 2
    except openai.APIStatusError as e:  # e.g. a bad budget: HTTP 400
        message = e.body.get("message") if isinstance(e.body, dict) else e
        print(f"video_chat.py: the server refused the request "
              f"({e.status_code}): {message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"video_chat.py: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        video = args.video or write_clip(Path(folder) / "clip.mp4")
        if args.base_url:
            return ask_server(args, video)
        return run_offline(args, video)


if __name__ == "__main__":
    sys.exit(main())
