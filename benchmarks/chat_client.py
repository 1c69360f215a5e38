"""Async chat-completions load client for image and video workloads against
``vllm serve``.

``vllm bench serve`` has no dataset for many questions about a few images,
for multi-turn conversations or for videos of a set frame count, so
``serve_matrix.py`` runs those with this client; the reliability suite reuses
it to close connections mid-stream.

    python benchmarks/chat_client.py --base-url http://127.0.0.1:8000 \\
        --workload questions --concurrency 64 --out questions.json
    python benchmarks/chat_client.py --workload multiturn --concurrency 64 \\
        --max-tokens 64 --out multiturn.json
    python benchmarks/chat_client.py --workload video --frames 64 \\
        --num-requests 512 --concurrency 256 --out video.json

Images and videos (mp4) go as base64 data URLs generated from a seed, so the
same request list comes back on every run. Summary keys follow ``vllm bench
serve``'s result JSON where they overlap (``completed``,
``output_throughput``, ``mean_ttft_ms``, ``p99_ttft_ms``, ``mean_tpot_ms``,
...).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# seed salts, so two workloads given the same seed never share an image
SALT = {"questions": 1, "multiturn": 2, "warmup": 3, "video": 4}
PERCENTILES = (50, 99)
VIDEO_QUESTION = "Describe what happens in this video."
# the rate the mp4 declares: vLLM's loaders keep every frame at any rate
# with num_frames -1, and Qwen's processors take time from it
VIDEO_FPS = 2.0

OPENERS = ("What is", "Describe", "How would you rate", "Can you explain",
           "Tell me about", "What do you notice about", "Comment on",
           "How strong is")
TOPICS = ("the dominant colour", "the brightness", "the contrast",
          "the texture", "the sharpest edge", "the largest shape",
          "the number of objects", "the main subject", "the background",
          "the lighting", "the mood", "the symmetry", "the noise level",
          "the colour palette", "the focal point", "the style")
PLACES = ("in the top-left corner", "in the top-right corner",
          "in the bottom-left corner", "in the bottom-right corner",
          "at the centre", "along the top edge", "along the bottom edge",
          "along the left edge", "along the right edge",
          "across the whole image", "in the upper half", "in the lower half",
          "in the left half", "in the right half", "near the middle",
          "in the darkest area")


# ---------------------------------------------------------------- workloads

def make_image(seed, size=(336, 336), fmt: str = "JPEG") -> bytes:
    """Noise pixels from ``seed`` (an int or a list of ints), encoded.

    Equal seeds give equal bytes, so a repeated image is a prefix-cache hit
    for vLLM exactly as a user re-sending a photo would be.
    """
    from PIL import Image
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                                  dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt.upper())
    return buffer.getvalue()


def image_url(seed, size=(336, 336), fmt: str = "JPEG") -> str:
    mime = "png" if fmt.upper() == "PNG" else "jpeg"
    data = base64.b64encode(make_image(seed, size, fmt)).decode()
    return f"data:image/{mime};base64,{data}"


def video_frames(seed, frames: int, size=(336, 336)) -> np.ndarray:
    """``frames`` RGB frames ``[T, H, W, 3]`` from ``seed``: a flat colour
    drifting from frame to frame and a moving square, so consecutive frames
    differ (EVS keeps what changes) and the mp4 stays small."""
    width, height = size
    rng = np.random.default_rng(seed)
    steps = np.arange(frames)[:, None]
    shades = ((rng.integers(0, 256, 3) + steps * rng.integers(1, 8, 3))
              % 256).astype(np.uint8)
    video = np.broadcast_to(shades[:, None, None, :],
                            (frames, height, width, 3)).copy()
    side = max(1, min(width, height) // 8)
    top = int(rng.integers(0, height - side + 1))
    for t in range(frames):
        left = (4 * t) % (width - side + 1)
        video[t, top:top + side, left:left + side] = 255 - shades[t]
    return video


def make_video(seed, frames: int, size=(336, 336)) -> bytes:
    """``video_frames`` as an mp4 (MPEG-4 part 2, which OpenCV writes with
    no extra codec) at ``VIDEO_FPS``: every frame is in the file."""
    import cv2
    width, height = size
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "video.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"),
                                 VIDEO_FPS, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write an mp4v video here")
        for frame in video_frames(seed, frames, size):
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # BGR
        writer.release()
        return Path(path).read_bytes()


def video_url(seed, frames: int, size=(336, 336)) -> str:
    data = base64.b64encode(make_video(seed, frames, size)).decode()
    return f"data:video/mp4;base64,{data}"


QUESTION_STYLES = ("long", "short", "repeat")
REPEATED_QUESTION = "What is this?"


def make_questions(n: int, seed: int = 0, style: str = "long") -> list[str]:
    """``n`` short questions in a seeded order.

    ``long``: every opener/topic/place combination once, then numbered
    variants, so no two requests share their text even when they share an
    image. The dummy model folders' tokenizers read characters, so these run
    to more tokens than a real tokenizer makes of them; ``short`` ("Q<i>?",
    distinct) and ``repeat`` (REPEATED_QUESTION every time) are as few
    characters as a real tokenizer's tokens for a one-line question.
    """
    if style not in QUESTION_STYLES:
        raise ValueError(f"question style must be one of {QUESTION_STYLES}, "
                         f"got {style!r}")
    if style == "short":
        return [f"Q{i}?" for i in range(n)]
    if style == "repeat":
        return [REPEATED_QUESTION] * n
    combos = [f"{o} {t} {p}" for o in OPENERS for t in TOPICS for p in PLACES]
    order = np.random.default_rng([seed, len(combos)]).permutation(len(combos))
    questions = []
    for i in range(n):
        text = combos[order[i % len(combos)]]
        if i >= len(combos):
            text += f", variant {i // len(combos)}"
        questions.append(text + "?")
    return questions


@dataclass
class ChatRequest:
    """One chat completion to send; ``tag`` labels it in the results."""
    messages: list
    max_tokens: int = 256
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    vllm_xargs: dict | None = None
    disconnect_after: int | None = None  # close the stream after k chunks
    extra_body: dict = field(default_factory=dict)
    tag: dict = field(default_factory=dict)

    def body(self, model: str) -> dict:
        body = {"model": model, "messages": self.messages,
                "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stream": self.stream}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.vllm_xargs:
            body["vllm_xargs"] = self.vllm_xargs
        body.update(self.extra_body)
        return body


def user_turn(url: str | None, text: str, kind: str = "image") -> dict:
    """A user message: ``text`` after one ``kind`` ("image" or "video")."""
    if url is None:
        return {"role": "user", "content": text}
    part = f"{kind}_url"
    return {"role": "user", "content": [
        {"type": part, part: {"url": url}}, {"type": "text", "text": text}]}


def questions_workload(num_requests: int = 2000, num_images: int = 32,
                       seed: int = 0, size=(336, 336), fmt: str = "JPEG",
                       style: str = "long",
                       **request_kwargs) -> list[ChatRequest]:
    """Many questions about few images, images taken round-robin (``style``:
    see ``make_questions``)."""
    urls = [image_url([seed, SALT["questions"], j], size, fmt)
            for j in range(num_images)]
    return [ChatRequest(messages=[user_turn(urls[i % num_images], question)],
                        tag={"index": i, "image": i % num_images},
                        **request_kwargs)
            for i, question in enumerate(make_questions(num_requests, seed,
                                                        style))]


def video_workload(num_requests: int = 512, frames: int = 16, seed: int = 0,
                   size=(336, 336), **request_kwargs) -> list[ChatRequest]:
    """One fresh video per request (no prefix-cache hit), each asked
    ``VIDEO_QUESTION``, so every prompt has the same length."""
    seeds = [[seed, SALT["video"], frames, i] for i in range(num_requests)]
    # OpenCV encodes outside the GIL: threads make the start-up shorter
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        urls = list(pool.map(lambda s: video_url(s, frames, size), seeds))
    return [ChatRequest(messages=[user_turn(url, VIDEO_QUESTION, "video")],
                        tag={"index": i, "frames": frames}, **request_kwargs)
            for i, url in enumerate(urls)]


@dataclass
class Conversation:
    """An image and the questions of its turns; answers come from the server."""
    image_url: str
    questions: list[str]
    tag: dict = field(default_factory=dict)


def multiturn_workload(num_conversations: int = 256, turns: int = 4,
                       seed: int = 0, size=(336, 336),
                       fmt: str = "JPEG") -> list[Conversation]:
    questions = make_questions(num_conversations * turns, seed)
    return [Conversation(image_url([seed, SALT["multiturn"], c], size, fmt),
                         questions[c * turns:(c + 1) * turns],
                         {"conversation": c})
            for c in range(num_conversations)]


ANSWER_STYLES = ("full", "short")


def resent_answer(result: "ChatResult", style: str = "full") -> str:
    """The answer a later turn sends back: as the server gave it (``full``),
    or (``short``) its first ``completion_tokens`` characters. A real
    model's answer re-tokenizes to about its own length; dummy weights'
    tokens decode to strings such as ``<extra_N>`` that the written folders'
    character tokenizer reads back as a token per character, so ``full``
    histories grow several times faster than a real chat's, and ``short``
    grows them by the answer's length (one token a character there)."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer style must be one of {ANSWER_STYLES}, "
                         f"got {style!r}")
    if style == "short" and result.completion_tokens:
        return result.text[:result.completion_tokens]
    return result.text


def conversation_messages(url: str, questions: list[str],
                          answers: list[str]) -> list[dict]:
    """The turn asking ``questions[-1]``: the image with the first question,
    then every earlier answer (as the server returned it) and question."""
    if len(answers) != len(questions) - 1:
        raise ValueError("need one answer per earlier question")
    messages = [user_turn(url, questions[0])]
    for answer, question in zip(answers, questions[1:]):
        messages.append({"role": "assistant", "content": answer})
        messages.append(user_turn(None, question))
    return messages


# ------------------------------------------------------------------ sending

@dataclass
class ChatResult:
    """What one request did; times in seconds from the run's start."""
    tag: dict = field(default_factory=dict)
    stream: bool = True
    sent: bool = False
    ok: bool = False
    http_status: int | None = None
    error: str | None = None
    cut: bool = False  # in flight or not yet sent when max_seconds ran out
    disconnected: bool = False  # the client closed the stream on purpose
    start: float | None = None
    ttft: float | None = None
    latency: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    usage: bool = False  # token counts came from the server's usage
    text: str = ""


def _error_message(status: int, text: str) -> str:
    try:
        data = json.loads(text)
        error = data.get("error")
        message = (error.get("message") if isinstance(error, dict) else error
                   ) or data.get("message") or text
    except (ValueError, AttributeError):
        message = text
    return f"HTTP {status}: {str(message)[:300]}"


def _take_usage(result: ChatResult, usage: dict | None) -> None:
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens") or 0
        result.completion_tokens = usage.get("completion_tokens") or 0
        result.usage = True


async def send(session, url: str, model: str, request: ChatRequest,
               result: ChatResult, clock=time.perf_counter,
               origin: float = 0.0) -> ChatResult:
    """POST one chat completion and fill ``result`` as it goes, so a request
    cancelled half-way still shows what it got."""
    import aiohttp
    result.stream, result.sent = request.stream, True
    start = clock()
    result.start = start - origin
    pieces: list[str] = []
    finished = False
    try:
        async with session.post(url, json=request.body(model)) as response:
            result.http_status = response.status
            if response.status != 200:
                result.error = _error_message(response.status,
                                              await response.text())
                return result
            if not request.stream:
                data = await response.json()
                result.latency = result.ttft = clock() - start
                pieces.append(data["choices"][0]["message"].get("content")
                              or "")
                _take_usage(result, data.get("usage"))
                result.ok = True
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = _error_message(200, data)
                    return result
                choices = chunk.get("choices") or []
                content = choices[0].get("delta", {}).get("content") \
                    if choices else None
                if content:
                    if result.ttft is None:
                        result.ttft = clock() - start
                    pieces.append(content)
                    result.chunks += 1
                    if (request.disconnect_after is not None
                            and result.chunks >= request.disconnect_after):
                        response.close()  # drop the connection, not reuse it
                        result.disconnected = finished = True
                        break
                _take_usage(result, chunk.get("usage"))
            result.latency = clock() - start
            if not result.usage:
                result.completion_tokens = result.chunks
            if not finished:
                result.error = "stream ended before [DONE]"
                return result
            result.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError,
            KeyError, IndexError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        result.cut = True
        raise
    finally:
        result.text = "".join(pieces)
    return result


def _session(concurrency: int):
    import aiohttp
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=6 * 3600))


async def _until(event) -> None:
    """Return once a ``threading.Event`` (set from another thread) is set."""
    while not event.is_set():
        await asyncio.sleep(0.05)


async def _finish(tasks: list, max_seconds: float | None,
                  stop: asyncio.Event, give_up=None) -> None:
    """Wait for every task, or until ``max_seconds`` or the ``give_up``
    event: then send nothing more and cancel what is in flight (the
    client hangs up, as one with a timeout does)."""
    if not tasks:
        return
    everything = asyncio.ensure_future(asyncio.wait(tasks))
    waiters = [everything]
    if give_up is not None:
        waiters.append(asyncio.ensure_future(_until(give_up)))
    await asyncio.wait(waiters, timeout=max_seconds,
                       return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    pending = [task for task in tasks if not task.done()]
    if pending:
        stop.set()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def run_requests(base_url: str, model: str, requests: list[ChatRequest],
                       concurrency: int, max_seconds: float | None = None,
                       clock=time.perf_counter, give_up=None):
    """Send ``requests`` with at most ``concurrency`` in flight; stop at
    ``max_seconds`` or once ``give_up`` (a ``threading.Event``) is set.

    Returns (results in request order, seconds from the first send to the
    last answer or to the cut).
    """
    url = base_url.rstrip("/") + "/v1/chat/completions"
    results = [ChatResult(tag=r.tag, stream=r.stream) for r in requests]
    semaphore, stop = asyncio.Semaphore(concurrency), asyncio.Event()
    async with _session(concurrency) as session:
        origin = clock()

        async def one(request, result):
            async with semaphore:
                if not stop.is_set():
                    await send(session, url, model, request, result, clock,
                               origin)

        tasks = [asyncio.create_task(one(q, r))
                 for q, r in zip(requests, results)]
        await _finish(tasks, max_seconds, stop, give_up)
        duration = clock() - origin
    for result in results:
        result.cut = result.cut or (stop.is_set() and not result.sent)
    return results, duration


async def run_conversations(base_url: str, model: str,
                            conversations: list[Conversation],
                            concurrency: int, max_seconds: float | None = None,
                            clock=time.perf_counter, answers: str = "full",
                            **request_kwargs):
    """Run conversations, ``concurrency`` of them at once, turns in order.

    Each turn resends the whole history with the answers the server gave
    (``answers``: as given, or shortened, ``resent_answer``); a
    conversation stops at its first failed turn. Turns never sent (after a
    failure or the cut) are listed with ``sent`` false.
    """
    url = base_url.rstrip("/") + "/v1/chat/completions"
    per_conversation: list[list[ChatResult]] = [[] for _ in conversations]
    semaphore, stop = asyncio.Semaphore(concurrency), asyncio.Event()
    async with _session(concurrency) as session:
        origin = clock()

        async def converse(conv: Conversation, results: list[ChatResult]):
            async with semaphore:
                history: list[str] = []
                for turn in range(len(conv.questions)):
                    if stop.is_set():
                        return
                    request = ChatRequest(
                        messages=conversation_messages(
                            conv.image_url, conv.questions[:turn + 1], history),
                        tag={**conv.tag, "turn": turn}, **request_kwargs)
                    result = ChatResult(tag=request.tag, stream=request.stream)
                    results.append(result)
                    await send(session, url, model, request, result, clock,
                               origin)
                    if not result.ok or result.disconnected:
                        return
                    history.append(resent_answer(result, answers))

        tasks = [asyncio.create_task(converse(c, r))
                 for c, r in zip(conversations, per_conversation)]
        await _finish(tasks, max_seconds, stop)
        duration = clock() - origin
    results = []
    for conv, done in zip(conversations, per_conversation):
        last = done[-1] if done else None
        ended = last is not None and not last.cut and (
            not last.ok or last.disconnected)
        results += done + [ChatResult(tag={**conv.tag, "turn": t},
                                      cut=stop.is_set() and not ended)
                           for t in range(len(done), len(conv.questions))]
    return results, duration


# ------------------------------------------------------------------ summary

def _stats(summary: dict, name: str, seconds: list[float]) -> None:
    values = np.asarray(seconds, dtype=float) * 1000
    summary[f"mean_{name}_ms"] = float(values.mean()) if len(values) else None
    summary[f"median_{name}_ms"] = (float(np.median(values)) if len(values)
                                    else None)
    for p in PERCENTILES:
        summary[f"p{p}_{name}_ms"] = (float(np.percentile(values, p))
                                      if len(values) else None)


def summarize(results: list[ChatResult], duration: float) -> dict:
    """Totals and latency statistics in ``vllm bench serve``'s key names.

    Only completed requests (answered in full) count towards tokens, TTFT,
    TPOT and latency; TPOT is (latency - TTFT) / (tokens - 1) of streamed
    requests with more than one token.
    """
    done = [r for r in results if r.ok and not r.disconnected]
    failed = [r for r in results if r.sent and not r.ok and not r.cut]
    output = sum(r.completion_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    summary = {
        "duration": duration,
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(failed),
        "disconnected": sum(r.disconnected for r in results),
        "cut": sum(r.cut for r in results),
        "not_sent": sum(not r.sent for r in results),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": rate(len(done)),
        "output_throughput": rate(output),
        "total_token_throughput": rate(prompt + output),
    }
    _stats(summary, "ttft", [r.ttft for r in done if r.ttft is not None])
    _stats(summary, "tpot", [(r.latency - r.ttft) / (r.completion_tokens - 1)
                             for r in done if r.stream
                             and r.ttft is not None and r.completion_tokens > 1])
    _stats(summary, "e2el", [r.latency for r in done])
    summary["error_counts"] = dict(collections.Counter(
        r.error for r in failed).most_common(10))
    return summary


# ---------------------------------------------------------------------- CLI

def parse_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


async def first_model(base_url: str) -> str:
    async with _session(1) as session:
        async with session.get(base_url.rstrip("/") + "/v1/models") as reply:
            return (await reply.json())["data"][0]["id"]


async def run_workload(args) -> tuple[list[ChatResult], float]:
    model = args.model or await first_model(args.base_url)
    size = parse_size(args.image_size)
    request_kwargs = dict(max_tokens=args.max_tokens, stream=not args.no_stream,
                          ignore_eos=not args.no_ignore_eos,
                          vllm_xargs=args.vllm_xargs,
                          disconnect_after=args.disconnect_after)
    if args.workload in ("questions", "video"):
        requests = (video_workload(args.num_requests, args.frames, args.seed,
                                   size, **request_kwargs)
                    if args.workload == "video" else
                    questions_workload(args.num_requests, args.num_images,
                                       args.seed, size, args.image_format,
                                       args.question_style,
                                       **request_kwargs))
        return await run_requests(args.base_url, model, requests,
                                  args.concurrency, args.max_seconds)
    conversations = multiturn_workload(args.conversations, args.turns,
                                       args.seed, size, args.image_format)
    return await run_conversations(args.base_url, model, conversations,
                                   args.concurrency, args.max_seconds,
                                   answers=args.answers, **request_kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="served model name (default: the "
                        "server's first)")
    parser.add_argument("--workload",
                        choices=("questions", "multiturn", "video"),
                        default="questions")
    parser.add_argument("--num-requests", type=int, default=2000,
                        help="questions, video: requests")
    parser.add_argument("--num-images", type=int, default=32,
                        help="questions: distinct images")
    parser.add_argument("--question-style", choices=QUESTION_STYLES,
                        default="long",
                        help="questions: long sentences; short (\"Q<i>?\") "
                        "or repeat (one question for all), as few characters "
                        "as a real tokenizer's tokens for a one-line question")
    parser.add_argument("--conversations", type=int, default=256,
                        help="multiturn: conversations")
    parser.add_argument("--turns", type=int, default=4,
                        help="multiturn: turns per conversation")
    parser.add_argument("--answers", choices=ANSWER_STYLES, default="full",
                        help="multiturn: each earlier answer sent back as "
                        "the server gave it, or short: its first characters, "
                        "as many as it had tokens (dummy weights' answers "
                        "re-tokenize several times longer than real ones)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests (questions) or conversations "
                        "(multiturn) in flight")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--no-ignore-eos", action="store_true")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--vllm-xargs", type=json.loads, default=None,
                        help="JSON dict sent as vllm_xargs")
    parser.add_argument("--disconnect-after", type=int, default=None,
                        help="close each stream after this many chunks")
    parser.add_argument("--frames", type=int, default=16,
                        help="video: frames of each request's video (the "
                        "server must keep them all: --media-io-kwargs "
                        "'{\"video\": {\"num_frames\": -1}}')")
    parser.add_argument("--image-size", default="336x336",
                        help="WxH of images, or of a video's frames")
    parser.add_argument("--image-format", default="JPEG",
                        choices=("JPEG", "PNG", "jpeg", "png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop sending and cancel what is in flight "
                        "after this long")
    parser.add_argument("--out", help="write parameters and summary as JSON")
    parser.add_argument("--requests-out",
                        help="write every request's record as JSON lines")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    results, duration = asyncio.run(run_workload(args))
    summary = summarize(results, duration)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"params": vars(args), **summary}, f, indent=1)
    if args.requests_out:
        with open(args.requests_out, "w") as f:
            for result in results:
                f.write(json.dumps(asdict(result)) + "\n")
    print(json.dumps({k: v for k, v in summary.items()
                      if not isinstance(v, dict)}, indent=1))
    return summary


if __name__ == "__main__":
    main()
