"""Stock vLLM against sparsemm behind ``vllm serve``, measured as users see it.

    python benchmarks/serve_matrix.py --workloads unique --concurrency 16,256 \\
        --max-seconds 90 --out serve.json
    python benchmarks/serve_matrix.py --workloads questions,multiturn \\
        --max-seconds 90 --out serve.json        # merges into the same JSON
    python benchmarks/serve_matrix.py --workloads video --video-frames 64 \\
        --backends stock,evs --max-seconds 90 --out serve.json
    python benchmarks/serve_matrix.py --table-only --out serve.json

For every server variant (stock ``--attention-backend FLASH_ATTN`` with its
default prefix caching, for videos stock with EVS, then sparsemm at each
budget) one ``vllm serve`` of a dummy-weight model runs on this GPU while each
selected workload's loads run against it in turn; then it is stopped and the
next variant starts:

* ``unique``: ``vllm bench serve`` on its ``random-mm`` dataset (one fresh
  image per request) at each ``--concurrency``.
* ``questions``: ``chat_client.py``: many distinct questions about few images
  (both backends' prefix caches reuse an image's KV).
* ``multiturn``: ``chat_client.py``: conversations about one image each,
  every turn resending the history with the server's answers, as returned
  or shortened to their token count (``--multiturn-answers``; the image
  servers' ``--max-model-len`` holds the longest turn, see
  ``shared_model_len``).
* ``kv8``: the ``unique`` load on a LLaVA-NeXT-7B-shaped model with an
  8 GiB KV cache, where memory bounds the batch.
* ``video`` (not run by default): ``chat_client.py``: one fresh mp4 per
  request, of each ``--video-frames`` count, every frame reaching the model,
  on a Qwen2.5-VL-7B-shaped model with an 8 GiB KV cache. Its third arm is
  stock with vLLM's own video-token pruning (EVS, ``--video-pruning-rate``)
  at the rate that keeps as many prompt tokens as sparsemm's budget
  (``video_budget.py``).

While a load runs ``/metrics`` is scraped about twice a second (peak running
requests, a token timeline), and once before and after (counter differences:
prefix-cache hit rate, tokens, server-side latency histograms). A load cut by
``--max-seconds`` is reported from the server's counters (``vllm bench serve``
writes no result when interrupted), and so is the run it is set against, a
row marked "(server)": the client's latencies hold the HTTP stream that the
server's histograms leave out. Every run is merged into ``--out`` by key
as soon as it ends, so several short invocations build one table; the key
and label name ``--server-args`` too (``--label``), so a run on other server
arguments sits beside the plain one instead of replacing it; a markdown
table with each figure's ratio to stock's (and sparsemm's output tok/s over
EVS's) is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import chat_client  # noqa: E402
import video_budget  # noqa: E402
from server_metrics import (MetricsPoller, active_rate,  # noqa: E402
                            cache_numbers, kv_tokens_per_request, peak,
                            pool_blocks_per_request, scrape, server_delta)
from server_process import (free_port, log_tail, spawn,  # noqa: E402
                            start_server, stop_process, wait_idle)

VLLM = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
DEFAULT_MAX_MODEL_LEN = 4096
# a --max-model-len raised for the multiturn load is a multiple of this
MODEL_LEN_STEP = 256
CLIENT = [sys.executable, str(HERE / "chat_client.py")]
SERVED_NAME = "model"
WORKLOADS = ("unique", "questions", "multiturn", "kv8", "video")
MULTITURN_SEED_STEP = 1000  # between the seeds of two answer styles' loads
DEFAULT_WORKLOADS = WORKLOADS[:4]
BENCH_WORKLOADS = ("unique", "kv8")
MODELS = {"llava-1.5-7b": "write_dummy_llava_15_7b",
          "llava-next-7b": "write_dummy_llava_next_7b",
          "llava-next-mistral-7b": "write_dummy_llava_next_mistral_7b",
          "qwen2-vl-7b": "write_dummy_qwen2_vl_7b",
          "qwen2.5-vl-7b": "write_dummy_qwen2_5_vl_7b",
          "qwen3-vl-8b": "write_dummy_qwen3_vl_8b",
          "llava-onevision-7b": "write_dummy_llava_onevision_7b",
          "internvl3-8b": "write_dummy_internvl3_8b"}
# score file for LLaVA models (Vicuna-7B heads), as benchmarks/benchmark.py uses
LLAVA_SCORES = "llava-v1.6-vicuna-7b"
FIGURES = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
           "prefix_cache_hit_rate", "peak_running", "kv_blocks_per_request",
           "errors")
RATIO_FIGURES = FIGURES[:-1] + ("pool_blocks_per_request",)
# video servers: every frame of the file reaches the model (vLLM samples 32
# by default), and no image budget in the profile
VIDEO_SERVER_ARGS = ["--media-io-kwargs",
                     json.dumps({"video": {"num_frames": -1}}),
                     "--limit-mm-per-prompt",
                     json.dumps({"image": 0, "video": 1})]


# ------------------------------------------------------------------ plan

@dataclass(frozen=True)
class Backend:
    """A server variant: stock FlashAttention, stock with EVS video-token
    pruning at the rate matched to a sparsemm budget, or sparsemm at one
    budget."""
    name: str  # "stock", "evs" or "sparsemm"
    budget: int | None = None
    settings: str = "{}"  # extra sparsemm settings, as JSON
    pruning_rate: float | None = None  # evs: --video-pruning-rate

    @property
    def label(self) -> str:
        if self.name == "stock":
            return "stock"
        if self.name == "evs":
            return f"evs-b{self.budget}-r{self.pruning_rate:.4g}"
        extra = "".join(f"+{k}={v}" for k, v in
                        sorted(json.loads(self.settings).items()))
        return f"sparsemm-b{self.budget}{extra}"

    def sparsemm_config(self, defaults: dict) -> dict | None:
        if self.name != "sparsemm":
            return None
        return {"budget": self.budget, **defaults, **json.loads(self.settings)}

    def server_args(self, defaults: dict) -> list[str]:
        if self.name == "evs":
            return ["--attention-backend", "FLASH_ATTN",
                    "--video-pruning-rate", str(self.pruning_rate)]
        if self.name == "stock":
            return ["--attention-backend", "FLASH_ATTN"]
        return ["--attention-backend", "sparsemm", "--additional-config",
                json.dumps({"sparsemm": self.sparsemm_config(defaults)})]


@dataclass
class Load:
    """One measured load; ``params`` is all the load generator is given."""
    workload: str
    concurrency: int
    params: dict

    @property
    def name(self) -> str:
        """The workload as run keys name it: a video load by its frames,
        questions of another style than long sentences by their style,
        conversations that send answers back shortened by ``short``,
        unique prompts sent at a fixed rate by their rate."""
        frames = self.params.get("frames")
        style = self.params.get("style") or self.params.get("answers")
        rate = self.params.get("request_rate")
        if frames:
            return f"{self.workload}-{frames}f"
        if rate:
            return f"{self.workload}-r{rate:g}"
        return f"{self.workload}-{style}" if style else self.workload


@dataclass
class ServerPlan:
    """One ``vllm serve`` and the loads run against it, in order; ``tag``
    names its ``--server-args``."""
    model: str
    model_dir: Path
    backend: Backend
    max_model_len: int
    kv_bytes: int | None = None
    extra_args: list[str] = field(default_factory=list)
    sparsemm_defaults: dict = field(default_factory=dict)
    loads: list[Load] = field(default_factory=list)
    tag: str = ""

    @property
    def label(self) -> str:
        """The backend's label, and the server arguments' tag after ``@``."""
        return tagged(self.backend.label, self.tag)

    def command(self, port: int) -> list[str]:
        return serve_command(self.model_dir, port, self.max_model_len,
                             self.backend.server_args(self.sparsemm_defaults),
                             self.kv_bytes, self.extra_args)


def serve_command(model_dir, port: int, max_model_len: int,
                  backend_args: list[str], kv_bytes: int | None = None,
                  extra_args=()) -> list[str]:
    cmd = VLLM + ["serve", str(model_dir), "--load-format", "dummy",
                  "--served-model-name", SERVED_NAME, "--port", str(port),
                  "--max-model-len", str(max_model_len), *backend_args]
    if kv_bytes:
        cmd += ["--kv-cache-memory-bytes", str(kv_bytes)]
    return cmd + list(extra_args)


def bench_command(model_dir, port: int, load: Load, result_dir,
                  result_filename: str) -> list[str]:
    """``vllm bench serve`` on random-mm: one image of a fixed size per
    request, fixed text and output lengths, greedy and ignoring EOS."""
    p = load.params
    width, height = p["image_size"]
    return VLLM + [
        "bench", "serve", "--backend", "openai-chat",
        "--endpoint", "/v1/chat/completions",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model_dir), "--served-model-name", SERVED_NAME,
        "--dataset-name", "random-mm", "--num-prompts", str(p["num_prompts"]),
        "--max-concurrency", str(load.concurrency),
        *(["--request-rate", f"{p['request_rate']:g}"]
          if p.get("request_rate") else []),
        "--random-input-len", str(p["input_len"]),
        "--random-output-len", str(p["output_len"]),
        "--random-range-ratio", "0",
        "--random-mm-base-items-per-request", "1",
        "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({height}, {width}, 1): 1.0}}",
        "--ignore-eos", "--temperature", "0", "--seed", str(p["seed"]),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--disable-tqdm",
        "--save-result", "--result-dir", str(result_dir),
        "--result-filename", result_filename]


def client_command(port: int, load: Load, out, requests_out,
                   max_seconds: float | None = None) -> list[str]:
    p = load.params
    width, height = p["image_size"]
    cmd = CLIENT + ["--base-url", f"http://127.0.0.1:{port}",
                    "--model", SERVED_NAME, "--workload", load.workload,
                    "--concurrency", str(load.concurrency),
                    "--max-tokens", str(p["max_tokens"]),
                    "--image-size", f"{width}x{height}",
                    "--seed", str(p["seed"]), "--out", str(out),
                    "--requests-out", str(requests_out)]
    if load.workload == "questions":
        cmd += ["--num-requests", str(p["num_requests"]),
                "--num-images", str(p["num_images"])]
        if p.get("style"):
            cmd += ["--question-style", p["style"]]
    elif load.workload == "video":
        cmd += ["--num-requests", str(p["num_requests"]),
                "--frames", str(p["frames"])]
    else:
        cmd += ["--conversations", str(p["conversations"]),
                "--turns", str(p["turns"])]
        if p.get("answers"):
            cmd += ["--answers", p["answers"]]
    if max_seconds is not None:
        cmd += ["--max-seconds", str(max_seconds)]
    return cmd


def tagged(label: str, tag: str | None) -> str:
    return f"{label}@{tag}" if tag else label


def args_tag(server_args: str) -> str:
    """A short name for ``--server-args``: ``--kv-cache-dtype fp8 --dtype
    bfloat16`` is ``kv-cache-dtype=fp8,dtype=bfloat16``; arguments that do
    not read well in a run key (long, JSON, paths) by a hash of them."""
    words = shlex.split(server_args or "")
    parts: list[str] = []
    for word in words:
        if word.startswith("--") or not parts:
            parts.append(word.removeprefix("--"))
        else:
            parts[-1] += ("," if "=" in parts[-1] else "=") + word
    tag = ",".join(parts)
    if not tag or re.fullmatch(r"[\w.:=,+-]{1,48}", tag):
        return tag
    digest = hashlib.sha1(shlex.join(words).encode()).hexdigest()
    return f"args-{digest[:8]}"


def server_tag(args) -> str:
    """``--label``, else the name of ``--server-args``."""
    if args.label is not None:
        return re.sub(r"[^\w.:=,+-]+", "_", args.label)
    return args_tag(args.server_args)


def ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def styles_of(option: str, text: str, choices: tuple[str, ...]) -> list[str]:
    """A comma list of styles, each one of ``choices``, each its own load."""
    styles = [s for s in text.split(",") if s]
    if not styles or set(styles) - set(choices):
        raise SystemExit(f"{option} takes a comma list of {choices}, got "
                         f"{text!r}")
    return styles


def rates(text: str) -> list[float | None]:
    """``--request-rates``: requests a second, ``inf`` (None) as fast as
    the concurrency lets them go."""
    out = []
    for x in str(text).split(","):
        x = x.strip()
        if x:
            try:
                rate = float(x)
            except ValueError:
                rate = 0
            if not rate > 0:
                raise SystemExit(f"--request-rates takes rates above 0 or "
                                 f"inf, got {x!r}")
            out.append(None if rate == float("inf") else rate)
    return out


def even_frames(text: str) -> str:
    """``--video-frames``: even counts only. vLLM's Qwen2-VL video loader
    keeps a whole number of temporal patches (two frames), dropping an odd
    count's last frame, while the processor ``video_budget.py`` counts with
    pads it to one more step: the planned prompt and EVS rate would be one
    step off."""
    counts = ints(text)
    odd = [n for n in counts if n <= 0 or n % 2]
    if not counts or odd:
        raise argparse.ArgumentTypeError(
            f"frame counts must be even and positive (vLLM's Qwen2-VL loader "
            f"drops an odd count's last frame); got {text!r}")
    return text


def model_folder(name_or_path: str, work_dir: Path) -> tuple[str, Path]:
    """A known model name is written (config, tokenizer, processor, no
    weights) under ``work_dir`` once; anything else is a folder to use."""
    if name_or_path in MODELS:
        folder = work_dir / name_or_path
        if not (folder / "config.json").exists():
            from vllm_sparsemm.testing import checkpoints
            getattr(checkpoints, MODELS[name_or_path])(folder)
        return name_or_path, folder
    folder = Path(name_or_path)
    return folder.name, folder


def sparsemm_defaults(model_dir: Path) -> dict:
    """LLaVA-1.5 and LLaVA-NeXT models get the shipped Vicuna-7B scores
    (LLaVA-1.5 and LLaVA-NeXT-Mistral have no file of their own, and
    sparsemm refuses to guess; their 32 x 32 query heads fit it); Qwen VL,
    LLaVA-OneVision and InternVL (Qwen2) models, which have no file, uniform
    budgets."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if config.get("model_type") in ("llava", "llava_next"):
        return {"head_scores": LLAVA_SCORES}
    if config.get("model_type") in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                    "llava_onevision", "internvl"):
        return {"head_scores": "uniform"}
    return {}


def backends(args, budgets: list[int]) -> list[Backend]:
    chosen = args.backends.split(",")
    out = [Backend("stock")] if "stock" in chosen else []
    if "sparsemm" in chosen:
        settings = json.dumps(json.loads(args.sparsemm_config or "{}"),
                              sort_keys=True)
        out += [Backend("sparsemm", b, settings) for b in budgets]
    return out


def loads_for(workload: str, args) -> list[Load]:
    size = chat_client.parse_size(args.image_size)
    if workload == "unique":
        return [Load("unique", c, {
            "num_prompts": args.num_prompts or max(4 * c, 200),
            "input_len": args.input_len, "output_len": args.output_len,
            "image_size": size, "seed": args.seed + c,
            **({"request_rate": rate} if rate else {})})
            for rate in rates(args.request_rates)
            for c in ints(args.concurrency)]
    if workload == "kv8":
        return [Load("kv8", c, {
            "num_prompts": args.kv8_num_prompts or max(4 * c, 200),
            "input_len": args.input_len, "output_len": args.kv8_output_len,
            "image_size": chat_client.parse_size(args.kv8_image_size),
            "seed": args.seed + c})
            for c in ints(args.kv8_concurrency)]
    if workload == "questions":
        styles = styles_of("--questions-style", args.questions_style,
                           chat_client.QUESTION_STYLES)
        return [Load("questions", c, {
            "num_requests": args.questions_requests,
            "num_images": args.questions_images,
            "max_tokens": args.output_len, "image_size": size,
            "seed": args.seed + c, **({"style": style} if style != "long"
                                      else {})})
            for style in styles for c in ints(args.questions_concurrency)]
    if workload == "multiturn":
        styles = styles_of("--multiturn-answers", args.multiturn_answers,
                           chat_client.ANSWER_STYLES)
        return [Load("multiturn", c, {
            "conversations": args.multiturn_conversations,
            "turns": args.multiturn_turns,
            "max_tokens": args.multiturn_output_len, "image_size": size,
            # each style its own images: none a prefix hit from the last load
            "seed": args.seed + c + MULTITURN_SEED_STEP * i,
            **({"answers": style} if style != "full" else {})})
            for i, style in enumerate(styles)
            for c in ints(args.multiturn_concurrency)]
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")


@functools.lru_cache(maxsize=None)
def longest_token_text(model_dir: str) -> tuple[str, int]:
    """The text of the output token that re-tokenizes into the most tokens,
    and that count. With dummy weights an answer is random token ids; the
    written folders' tokenizers spell most as ``<extra_N>``, one token per
    character once the text comes back in the history."""
    tokenizer = video_budget.processor_of(model_dir).tokenizer
    ids = [[i] for i in range(len(tokenizer))]
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None:
        texts = fast.decode_batch(ids, skip_special_tokens=True)
        counts = [len(e.ids) for e in
                  fast.encode_batch(texts, add_special_tokens=False)]
    else:
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        counts = [len(x) for x in tokenizer(
            texts, add_special_tokens=False)["input_ids"]]
    worst = max(range(len(counts)), key=counts.__getitem__)
    return texts[worst], counts[worst]


def multiturn_prompt_tokens(model_dir: Path, load: Load):
    """(prompt tokens, tokens per answer token) of a multiturn load's last
    turn at its longest: every earlier answer ``max_tokens`` of the token
    ``longest_token_text`` finds and every question the load's longest,
    counted by the folder's own processor, as vLLM's chat path does. None
    for a folder without a processor."""
    from PIL import Image
    p = load.params
    try:
        processor = video_budget.processor_of(str(model_dir))
        text, per_token = longest_token_text(str(model_dir))
    except (OSError, ValueError):
        return None
    question = max(chat_client.make_questions(
        p["conversations"] * p["turns"], p["seed"]), key=len)
    answer = chat_client.resent_answer(chat_client.ChatResult(
        text=text * p["max_tokens"], completion_tokens=p["max_tokens"]),
        p.get("answers", "full"))
    if p.get("answers") == "short":  # one token a character
        per_token = 1
    asked = {"role": "user", "content": [{"type": "text", "text": question}]}
    answered = {"role": "assistant",
                "content": [{"type": "text", "text": answer}]}
    messages = [{"role": "user", "content": [{"type": "image"},
                                             *asked["content"]]}]
    messages += [answered, asked] * (p["turns"] - 1)
    prompt = processor.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=True)
    ids = processor(text=[prompt],
                    images=[Image.new("RGB", tuple(p["image_size"]))],
                    add_special_tokens=False)["input_ids"][0]
    return len(ids), per_token


def max_positions(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or config
    return (text.get("max_position_embeddings")
            or config.get("max_position_embeddings"))


def shared_model_len(args, name: str, folder: Path,
                     loads: list[Load]) -> int:
    """``--max-model-len`` of the model's image servers. Unset, it is the
    default, raised to what the multiturn load's last turn needs at its
    longest (prompt and answer); where the given length or the model's
    positions cannot hold that, the plan is refused. A turn past it would
    be refused (HTTP 400) or answered short, and as each arm's answers
    differ, the arms would no longer run the same load: the worst case,
    not a typical one, keeps every turn whole on every arm. Every arm gets
    this one length, so stock and sparsemm stay alike."""
    counted = [(multiturn_prompt_tokens(folder, ld), ld) for ld in loads
               if ld.workload == "multiturn"]
    counted = [(c[0] + ld.params["max_tokens"], c, ld) for c, ld in counted
               if c]
    if not counted:
        return args.max_model_len or DEFAULT_MAX_MODEL_LEN
    need, (prompt, per_token), load = max(counted, key=lambda x: x[0])
    out, turns = load.params["max_tokens"], load.params["turns"]
    reach = (f"multiturn on {name}: a last turn can reach {prompt} prompt + "
             f"{out} output tokens")
    if args.max_model_len and need <= args.max_model_len:
        return args.max_model_len
    positions = max_positions(folder)
    if positions and need > positions:
        # the prompt grows by per_token for each output token of each
        # earlier turn; the rest of it stays
        rest = prompt - (turns - 1) * out * per_token
        fits = (positions - rest) // ((turns - 1) * per_token + 1)
        raise SystemExit(f"{reach}, past the model's {positions} positions: "
                         f"give --multiturn-output-len {fits} or less")
    if args.max_model_len:
        raise SystemExit(f"{reach}, past --max-model-len {args.max_model_len}:"
                         f" give {need} or more, or leave it unset")
    length = max(DEFAULT_MAX_MODEL_LEN, -(-need // MODEL_LEN_STEP)
                 * MODEL_LEN_STEP)
    length = min(length, positions) if positions else length
    if length > DEFAULT_MAX_MODEL_LEN:
        print(f"-- {reach}: --max-model-len {length}", flush=True)
    return length


def video_loads(args, folder: Path) -> list[Load]:
    """One load per frame count and concurrency; ``prompt_tokens`` is what
    the model's processor makes of such a request (EVS is set from it)."""
    size = chat_client.parse_size(args.video_size)
    loads = []
    for frames in ints(args.video_frames):
        tokens = video_budget.video_prompt_tokens(
            folder, frames, size, chat_client.VIDEO_QUESTION)
        loads += [Load("video", c, {
            "num_requests": args.video_num_requests, "frames": frames,
            "max_tokens": args.video_output_len, "image_size": size,
            "seed": args.seed + c, "prompt_tokens": tokens})
            for c in ints(args.video_concurrency)]
    return loads


def evs_arms(budgets: list[int], loads: list[Load], folder: Path):
    """(EVS backend, its loads) per budget and frame count: the rate that
    keeps sparsemm's KV depends on both. No arm where sparsemm keeps the
    whole prompt (EVS would prune nothing)."""
    kind = video_budget.model_type(folder)
    if kind not in video_budget.EVS_TYPES:
        raise SystemExit(f"the evs arm is set up for {video_budget.EVS_TYPES}"
                         f" models; {folder} is {kind!r}: choose "
                         f"--backends stock,sparsemm")
    arms = []
    for budget in budgets:
        for frames in dict.fromkeys(ld.params["frames"] for ld in loads):
            same = [ld for ld in loads if ld.params["frames"] == frames]
            tokens = same[0].params["prompt_tokens"]
            rate = video_budget.evs_pruning_rate(
                tokens["text"], tokens["video"], tokens["per_frame"], budget)
            if rate:
                arms.append((Backend("evs", budget, pruning_rate=rate), same))
    return arms


def video_arms(args, folder: Path) -> list[tuple[Backend, list[Load]]]:
    """Stock, EVS at each budget's rate (one server per frame count), then
    sparsemm at each budget."""
    loads = video_loads(args, folder)
    budgets = ints(args.video_budgets)
    chosen = backends(args, budgets)
    evs = (evs_arms(budgets, loads, folder)
           if "evs" in args.backends.split(",") else [])
    return ([(b, loads) for b in chosen if b.name == "stock"] + evs
            + [(b, loads) for b in chosen if b.name == "sparsemm"])


def server_plans(args, model: str, arms_of, kv_bytes: int | None = None,
                 max_model_len: int | None = None,
                 server_args=()) -> list[ServerPlan]:
    """One server per (backend, loads) of ``arms_of(model folder)``."""
    name, folder = model_folder(model, Path(args.work_dir))
    extra = shlex.split(args.server_args or "") + list(server_args)
    tag = server_tag(args)
    return [ServerPlan(name, folder, backend,
                       max_model_len or args.max_model_len, kv_bytes,
                       extra + profiler_args(
                           args, f"{name}_{tagged(backend.label, tag)}"),
                       sparsemm_defaults(folder), loads, tag)
            for backend, loads in arms_of(folder)]


def plan(args) -> list[ServerPlan]:
    """Server variants in run order: per model group, stock first."""
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; "
                             f"choose from {WORKLOADS}")

    def same_loads(budgets: str, loads: list[Load]):
        return lambda _: [(b, loads) for b in backends(args, ints(budgets))]

    plans = []
    shared = [w for w in WORKLOADS[:3] if w in workloads]
    if shared:
        loads = [ld for w in shared for ld in loads_for(w, args)]
        name, folder = model_folder(args.model, Path(args.work_dir))
        plans += server_plans(
            args, args.model, same_loads(args.budgets, loads),
            max_model_len=shared_model_len(args, name, folder, loads))
    if "kv8" in workloads:
        plans += server_plans(args, args.kv8_model, same_loads(
            args.kv8_budgets, loads_for("kv8", args)), args.kv8_bytes,
            args.max_model_len or DEFAULT_MAX_MODEL_LEN)
    if "video" in workloads:
        plans += server_plans(args, args.video_model,
                              lambda folder: video_arms(args, folder),
                              args.video_kv_bytes, args.video_max_model_len,
                              VIDEO_SERVER_ARGS)
    return plans


def profiler_args(args, server_name: str) -> list[str]:
    """With --profile-at: vLLM's torch profiler, worker side only, at most
    --profile-steps engine steps, its traces under the log folder."""
    if args.profile_at is None:
        return []
    folder = Path(args.log_dir) / "profiles" / re.sub(r"[^\w.+=-]+", "_",
                                                     server_name)
    return ["--profiler-config", json.dumps({
        "profiler": "torch", "torch_profiler_dir": str(folder.resolve()),
        "torch_profiler_with_stack": False, "ignore_frontend": True,
        "max_iterations": args.profile_steps})]


class ProfileWindow(threading.Thread):
    """``/start_profile`` ``at`` seconds after ``begin`` is set (the load
    started sending: a load generator first builds its requests, for
    seconds, while the server idles), ``/stop_profile`` (which writes the
    trace) ``seconds`` later, or when the load ends first."""

    def __init__(self, base_url: str, at: float, seconds: float,
                 begin: threading.Event, source: str = ""):
        super().__init__(daemon=True)
        self.base, self.at, self.seconds = base_url, at, seconds
        self.begin, self.done = begin, threading.Event()
        self.record = {"at_s": at, "seconds": seconds, "from": source,
                       "started": False, "stopped": False}

    def _post(self, path: str) -> bool:
        request = urllib.request.Request(self.base + path, data=b"",
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120):
                return True
        except OSError as exc:
            self.record["error"] = f"{path}: {exc}"
            return False

    def run(self):
        while not self.begin.is_set():
            if self.done.wait(0.1):
                return
        if self.done.wait(self.at):
            return
        self.record["started"] = self._post("/start_profile")
        if self.record["started"]:
            self.done.wait(self.seconds)
            self.record["stopped"] = self._post("/stop_profile")

    def stop(self) -> dict:
        self.done.set()
        self.join(timeout=180)
        return self.record


def run_key(workload: str, model: str, concurrency: int, label: str) -> str:
    return f"{workload}/{model}/c{concurrency}/{label}"


# ------------------------------------------------------------- warm-up

def warm_up(base_url: str, seed: int, video_size=None,
            requests: int = 1) -> str | None:
    """``requests`` small requests at once, each with its own image (a
    video server: a short video of frames of ``video_size``), so that
    first-request set-up (in every API server process, not just the one
    a single request reaches) is not in the first load; returns the first
    error, if any."""
    def turn(i):
        salt = [seed, chat_client.SALT["warmup"]] + ([i] if i else [])
        if video_size:
            return chat_client.user_turn(
                chat_client.video_url(salt, 4, video_size),
                "Describe the video.", "video")
        return chat_client.user_turn(chat_client.image_url(salt),
                                     "Describe the image.")
    batch = [chat_client.ChatRequest(messages=[turn(i)], max_tokens=8,
                                     stream=False)
             for i in range(max(1, requests))]
    import asyncio
    results, _ = asyncio.run(chat_client.run_requests(
        base_url, SERVED_NAME, batch, len(batch)))
    return next((r.error for r in results if r.error), None)


def run_load(cmd: list[str], log_path, max_seconds: float | None,
             start_marker: str | None = None,
             started: threading.Event | None = None) -> tuple[int, bool]:
    """Run a load generator with output teed to ``log_path``.

    ``started`` (if given) is set when ``start_marker`` appears in its
    output. With ``max_seconds``, it is stopped that long after that (or
    after it starts, with no marker) and the load counts as cut. Returns
    (exit code, cut).
    """
    proc = spawn(cmd, subprocess.PIPE, text=True, errors="replace")
    started = started or threading.Event()

    def pump():
        with open(log_path, "w") as log:
            log.write(shlex.join(cmd) + "\n")
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if start_marker and start_marker in line:
                    started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        if max_seconds is not None:
            if start_marker:
                while not started.wait(0.1) and proc.poll() is None:
                    pass
            try:
                proc.wait(max_seconds)
            except subprocess.TimeoutExpired:
                cut = True
                stop_process(proc, grace=10.0)
        proc.wait()
    finally:
        if proc.poll() is None:
            stop_process(proc, grace=10.0)
        reader.join(timeout=10)
    return proc.returncode, cut


# ----------------------------------------------------------------- a run

def measure(server: ServerPlan, load: Load, port: int, log_dir: Path,
            max_seconds: float | None,
            profile: tuple[float, float] | None = None) -> dict:
    """Run one load against the running server and return its record;
    ``profile = (at, seconds)`` profiles that window of it."""
    key = run_key(load.name, server.model, load.concurrency, server.label)
    stem = str(log_dir / re.sub(r"[^\w.+=-]+", "_", key))
    base = f"http://127.0.0.1:{port}"
    result_file, load_log = Path(stem + ".result.json"), Path(stem + ".log")
    if load.workload in BENCH_WORKLOADS:
        cmd = bench_command(server.model_dir, port, load, log_dir,
                            result_file.name)
        # vllm bench serve has no time cap: stop it that long after its
        # timed run starts
        marker, limit = "Starting main benchmark run", max_seconds
    else:
        cmd = client_command(port, load, result_file,
                             stem + ".requests.jsonl", max_seconds)
        marker = None
        limit = None if max_seconds is None else max_seconds + 120
    result_file.unlink(missing_ok=True)
    wait_idle(base)
    before = scrape(base)
    poller = MetricsPoller(base + "/metrics")
    poller.start()
    # a profile counts from vllm bench serve's marker, or from the first
    # request of a client's load the server holds
    marked, window = threading.Event(), None
    if profile:
        window = (ProfileWindow(base, *profile, marked, "start marker")
                  if marker else
                  ProfileWindow(base, *profile, poller.busy, "first request"))
        window.start()
    started = time.monotonic()
    try:
        code, cut = run_load(cmd, load_log, limit, marker, marked)
    finally:
        timeline = poller.stop()
        profiled = window.stop() if window else None
    wall = time.monotonic() - started
    after = scrape(base)
    result, error = None, None
    if code == 0 and result_file.exists():
        result = json.loads(result_file.read_text())
        cut = cut or bool(result.get("cut"))
    elif not cut:
        error = (f"load exited with code {code}; {load_log} ends:\n"
                 + log_tail(load_log, 15))
    server_numbers = server_delta(before, after)
    server_numbers["output_throughput"] = active_rate(timeline)
    block_size, num_blocks = cache_numbers(before)
    run = {
        "key": key, "workload": load.name, "model": server.model,
        "model_dir": str(server.model_dir), "concurrency": load.concurrency,
        "backend": server.backend.name, "label": server.label,
        "server_tag": server.tag, "budget": server.backend.budget,
        "video_pruning_rate": server.backend.pruning_rate,
        "planned_prompt_kv": planned_prompt_kv(server.backend, load),
        "block_size": block_size, "num_gpu_blocks": num_blocks,
        "sparsemm": server.backend.sparsemm_config(server.sparsemm_defaults),
        "kv_cache_memory_bytes": server.kv_bytes,
        "max_model_len": server.max_model_len,
        "server_extra_args": server.extra_args,
        "load_params": load.params, "max_seconds": max_seconds,
        "serve_cmd": server.command(port), "load_cmd": cmd,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_s": round(wall, 2), "cut": cut, "load": result,
        "load_error": error, "server": server_numbers,
        "peak_running": peak(timeline, 1), "peak_waiting": peak(timeline, 2),
        "peak_kv_cache_usage": peak(timeline, 4), "timeline": timeline,
        "profiled": profiled,
    }
    run["figures"] = figures(run)
    return run


def failed_runs(server: ServerPlan, error: str) -> dict:
    """Records for loads that never ran because the server did not start."""
    runs = {}
    for load in server.loads:
        key = run_key(load.name, server.model, load.concurrency,
                      server.label)
        runs[key] = {
            "key": key, "workload": load.name, "model": server.model,
            "concurrency": load.concurrency, "backend": server.backend.name,
            "label": server.label, "server_tag": server.tag,
            "budget": server.backend.budget,
            "load_params": load.params, "server_error": error, "cut": False,
            "load": None, "server": {}, "peak_running": None}
        runs[key]["figures"] = figures(runs[key])
    return runs


def planned_prompt_kv(backend: Backend, load: Load) -> int | None:
    """Prompt KV tokens per request (per KV head) this arm should keep, for
    loads whose prompt the model's processor counted (video)."""
    tokens = load.params.get("prompt_tokens")
    if not tokens:
        return None
    return video_budget.arm_prompt_kv(backend.name, tokens, backend.budget,
                                      backend.pruning_rate)


# ---------------------------------------------------------- tabulation

def kv_blocks_per_request(run: dict) -> float | None:
    """``kv_tokens_per_request`` in blocks of the server's block size."""
    tokens = kv_tokens_per_request(run.get("server") or {})
    size = run.get("block_size")
    return None if tokens is None or not size else tokens / size


def figures(run: dict, server_only: bool = False) -> dict:
    """The table's numbers for a run: the load generator's, or the server's
    counters when the load was cut (or wrote nothing) or ``server_only``."""
    load, server = run.get("load") or {}, run.get("server") or {}
    source = load if load and not run.get("cut") and not server_only \
        else server
    return {
        "output_throughput": source.get("output_throughput"),
        "mean_ttft_ms": source.get("mean_ttft_ms"),
        "p99_ttft_ms": source.get("p99_ttft_ms"),
        "mean_tpot_ms": source.get("mean_tpot_ms"),
        "prefix_cache_hit_rate": server.get("prefix_cache_hit_rate"),
        "peak_running": run.get("peak_running"),
        "kv_blocks_per_request": kv_blocks_per_request(run),
        "pool_blocks_per_request": pool_blocks_per_request(
            run.get("timeline") or [], run.get("num_gpu_blocks")),
        "mean_queue_ms": server.get("mean_queue_ms"),
        "mean_prefill_ms": server.get("mean_prefill_ms"),
        "errors": load.get("failed") if load else None,
        "completed": source.get("completed"),
        "source": "load" if source is load and load else "server",
    }


def stock_key(run: dict) -> str:
    """Stock's run on the same server arguments (runs written before they
    had a tag have none)."""
    return run_key(run["workload"], run["model"], run["concurrency"],
                   tagged("stock", run.get("server_tag")))


def _same(params) -> str:
    """Parameters as JSON, so a tuple read back as a list still matches."""
    return json.dumps(params, sort_keys=True)


def evs_run(runs: dict, run: dict) -> dict | None:
    """The EVS run set to keep what a sparsemm run's budget keeps, on the
    same workload, model, concurrency and server arguments."""
    return next((other for other in runs.values()
                 if other["backend"] == "evs" and run["backend"] == "sparsemm"
                 and other.get("budget") == run.get("budget")
                 and all(other[k] == run[k]
                         for k in ("workload", "model", "concurrency"))
                 and (other.get("server_tag") or "")
                 == (run.get("server_tag") or "")),
                None)


def compute_ratios(runs: dict) -> dict:
    """Each sparsemm (and EVS) figure over stock's, for the same workload,
    model, concurrency and load parameters; a sparsemm run's over its EVS
    run's too, under ``vs_evs``. A stock run and the runs set against it
    read one source (``from_server`` marks those read from the server)."""
    stocks = {key: stock_run(runs, run) for key, run in runs.items()}
    ratios, on_server = {}, server_read_groups(runs, stocks)
    for key, run in runs.items():
        stock = stocks[key]
        group = run if run["backend"] == "stock" else stock
        server = group is not None and group["key"] in on_server
        if stock is not None:
            ratios[key] = figure_ratios(
                read(run, server), read(stock, server), RATIO_FIGURES)
        if server and run["figures"]["source"] != "server":
            ratios.setdefault(key, {})["from_server"] = True
        evs = evs_run(runs, run)
        if not _comparable(run, evs):
            continue
        pair = (read(run, server), read(evs, server)) \
            if stock is not None and stocks[evs["key"]] is stock \
            else paired_figures(run, evs)
        ratios.setdefault(key, {})["vs_evs"] = figure_ratios(
            *pair, RATIO_FIGURES)
    return ratios


def stock_run(runs: dict, run: dict) -> dict | None:
    """The stock run a run is set against, if measured with its load
    parameters (none for a stock run)."""
    if run["backend"] == "stock":
        return None
    stock = runs.get(stock_key(run))
    return stock if _comparable(run, stock) else None


def server_read_groups(runs: dict, stocks: dict) -> set[str]:
    """Keys of the stock runs whose group (stock and every run set against
    it; ``stocks``: each run's :func:`stock_run`) reads the server's
    counters because one of them was cut: a ratio never sets the client's
    clock, which includes the HTTP stream, against the server's histograms,
    and a table's rows stay comparable."""
    return {stock["key"] for key, stock in stocks.items()
            if stock is not None and "server" in (
                runs[key]["figures"]["source"], stock["figures"]["source"])}


def read(run: dict, server: bool) -> dict:
    """A run's figures: the server's counters if ``server`` (its own
    figures already are for a cut run), else its own."""
    return figures(run, server_only=True) if server and \
        run["figures"]["source"] != "server" else run["figures"]


def paired_figures(run: dict, other: dict) -> tuple[dict, dict]:
    """Both runs' figures from one source: the server's counters for both
    when either load was cut (runs with no stock run between them)."""
    mixed = run["figures"]["source"] != other["figures"]["source"]
    return read(run, mixed), read(other, mixed)


def _comparable(run: dict, other: dict | None) -> bool:
    return other is not None and _same(other.get("load_params")) == _same(
        run.get("load_params"))


def figure_ratios(mine: dict, theirs: dict, names) -> dict:
    """``mine[f] / theirs[f]`` for each figure ``f`` of ``names`` that both
    runs report (stock's non-zero)."""
    return {f: mine[f] / theirs[f] for f in names
            if mine.get(f) is not None and theirs.get(f)}


def _cell(value, fmt: str, ratio=None) -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


ARMS = ("stock", "evs", "sparsemm")


def _order(run: dict) -> tuple:
    """Table order: workload, frames, model, server arguments,
    concurrency, the workload's variant (``multiturn-short`` after
    ``multiturn``), then stock, EVS and sparsemm, by budget."""
    w = run["workload"].split("-")[0]
    return (WORKLOADS.index(w) if w in WORKLOADS else len(WORKLOADS),
            (run.get("load_params") or {}).get("frames") or 0, run["model"],
            run.get("server_tag") or "", run["concurrency"], run["workload"],
            ARMS.index(run["backend"])
            if run["backend"] in ARMS else len(ARMS),
            run.get("budget") or 0, run["label"])


def table(runs: dict, ratios: dict) -> str:
    """Markdown: one row per run; other cells carry their ratio to stock,
    and a sparsemm run its output tok/s over its EVS run's."""
    lines = ["| workload | model | conc | backend | out tok/s | mean TTFT ms "
             "| p99 TTFT ms | mean TPOT ms | prefix hit | peak running "
             "| KV blocks/req | errors | tok/s vs EVS |", "|" + "---|" * 13]
    formats = {"output_throughput": "{:.0f}", "mean_ttft_ms": "{:.1f}",
               "p99_ttft_ms": "{:.1f}", "mean_tpot_ms": "{:.2f}",
               "prefix_cache_hit_rate": "{:.1%}", "peak_running": "{:.0f}",
               "kv_blocks_per_request": "{:.1f}", "errors": "{:d}"}
    for run in sorted(runs.values(), key=_order):
        ratio = ratios.get(run["key"], {})
        fig = read(run, bool(ratio.get("from_server")))
        label = run["label"]
        if run.get("server_error"):
            label += " (no server)"
        elif run.get("cut"):
            label += " (cut)"
        elif ratio.get("from_server"):
            label += " (server)"
        elif run.get("load_error"):
            label += " (load failed)"
        if (run.get("profiled") or {}).get("started"):
            label += " (profiled)"
        cells = [_cell(fig.get(f), formats[f], ratio.get(f)) for f in FIGURES]
        vs_evs = ratio.get("vs_evs", {}).get("output_throughput")
        cells.append("-" if vs_evs is None else f"{vs_evs:.2f}x")
        lines.append(f"| {run['workload']} | {run['model']} | "
                     f"{run['concurrency']} | {label} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def gpu_name() -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def merge(path: Path, new_runs: dict, invocation: list[str] | None = None,
          gpu: str | None = None, ratios_of=None, table_of=None) -> dict:
    """Merge runs into the JSON at ``path`` by key, recompute ratios and the
    table (``ratios_of``/``table_of``: another tool's, else this one's), and
    write it back whole (via a temporary file)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    meta = data.get("meta", {})
    runs = {**data.get("runs", {}), **new_runs}
    try:
        import vllm
        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    meta["gpu"] = gpu or meta.get("gpu")
    meta["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    if invocation and invocation not in meta.setdefault("invocations", []):
        meta["invocations"].append(invocation)
    ratios = (ratios_of or compute_ratios)(runs)
    data = {"meta": meta, "runs": runs, "ratios": ratios,
            "table": (table_of or table)(runs, ratios)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(results_json(data) + "\n")
    tmp.replace(path)
    return data


def results_json(value, level: int = 0) -> str:
    """JSON indented by one space a level, except that a list or object
    holding no list or object stays on one line: a timeline sample, a
    command, a run's figures each read as one line, and a file is much
    smaller than with every number on its own."""
    nested = value.values() if isinstance(value, dict) else value
    if not isinstance(value, (dict, list)) or not any(
            isinstance(v, (dict, list)) for v in nested):
        return json.dumps(value)
    inner = " " * (level + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {results_json(v, level + 1)}"
                 for k, v in value.items()]
    else:
        items = [inner + results_json(v, level + 1) for v in value]
    opening, closing = "{}" if isinstance(value, dict) else "[]"
    return (opening + "\n" + ",\n".join(items) + "\n" + " " * level
            + closing)


# --------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma list of {WORKLOADS}")
    p.add_argument("--backends", default="stock,evs,sparsemm",
                   help="comma list of stock, evs (video only: stock with "
                   "--video-pruning-rate keeping what each budget keeps), "
                   "sparsemm")
    p.add_argument("--model", default="llava-1.5-7b",
                   help=f"{list(MODELS)} (written locally) or a model folder")
    p.add_argument("--budgets", default="128",
                   help="sparsemm budgets (comma list)")
    p.add_argument("--sparsemm-config", default="{}",
                   help="extra sparsemm settings as JSON, e.g. "
                   '\'{"decode_kernel": "flash_attn"}\'')
    p.add_argument("--server-args", default="",
                   help="extra vllm serve arguments, one string")
    p.add_argument("--label", default=None,
                   help="names --server-args in run keys and the table, "
                   "after '@' (default: the arguments themselves, shortened;"
                   " '': no name, as runs without --server-args)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"unset: {DEFAULT_MAX_MODEL_LEN}, raised where the "
                   "multiturn load's longest turn needs more (every arm "
                   "alike)")
    p.add_argument("--concurrency", default="1,16,64,256,1024",
                   help="unique: concurrencies")
    p.add_argument("--request-rates", default="inf",
                   help="unique: requests a second (Poisson arrivals, "
                   "vllm bench serve's --request-rate), each with every "
                   "concurrency as its cap; a fixed rate compares TTFT at "
                   "equal load")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="unique: prompts per run; unset or 0: max(4C, 200)")
    p.add_argument("--input-len", type=int, default=64,
                   help="unique, kv8: text tokens besides the image")
    p.add_argument("--output-len", type=int, default=256,
                   help="unique, questions: output tokens per request")
    p.add_argument("--image-size", default="336x336", help="WxH")
    p.add_argument("--questions-concurrency", default="256,64")
    p.add_argument("--questions-style", default="long",
                   help="comma list of long (sentences), short (\"Q<i>?\") "
                   "and repeat (one question for all): the last two as few "
                   "characters as a real tokenizer's tokens, so a prefix "
                   "hit recomputes image tokens (each its own load)")
    p.add_argument("--questions-requests", type=int, default=2000)
    p.add_argument("--questions-images", type=int, default=32)
    p.add_argument("--multiturn-concurrency", default="64,256",
                   help="conversations in flight")
    p.add_argument("--multiturn-conversations", type=int, default=256)
    p.add_argument("--multiturn-turns", type=int, default=4)
    p.add_argument("--multiturn-answers", default="full",
                   help="comma list of full (each answer sent back as the "
                   "server gave it) and short (its first characters, as many "
                   "as it had tokens: dummy weights' answers re-tokenize "
                   "several times longer than a real model's; each its own "
                   "load)")
    p.add_argument("--multiturn-output-len", type=int, default=64,
                   help="output tokens per turn (answers return as text and "
                   "dummy weights' tokens re-tokenize long: the history "
                   "grows fast, and --max-model-len with it)")
    p.add_argument("--kv8-model", default="llava-next-7b")
    p.add_argument("--kv8-bytes", type=int, default=8 * 2**30,
                   help="--kv-cache-memory-bytes of the kv8 servers")
    p.add_argument("--kv8-budgets", default="64,256")
    p.add_argument("--kv8-concurrency", default="256")
    p.add_argument("--kv8-num-prompts", type=int, default=256,
                   help="kv8: prompts per run; 0: max(4C, 200)")
    p.add_argument("--kv8-output-len", type=int, default=512)
    p.add_argument("--kv8-image-size", default="672x672",
                   help="WxH (LLaVA-NeXT tiles it: a long, KV-heavy prompt)")
    p.add_argument("--video-model", default="qwen2.5-vl-7b",
                   help="video: the model (EVS needs Qwen2.5-VL)")
    p.add_argument("--video-frames", default="16,64", type=even_frames,
                   help="video: frames per video, even (each its own load; "
                   "every frame reaches the model)")
    p.add_argument("--video-size", default="336x336",
                   help="video: WxH of the frames")
    p.add_argument("--video-budgets", default="256",
                   help="video: sparsemm budgets, each with its EVS arm")
    p.add_argument("--video-concurrency", default="256")
    p.add_argument("--video-num-requests", type=int, default=512,
                   help="video: requests per load, each its own video")
    p.add_argument("--video-output-len", type=int, default=256)
    p.add_argument("--video-kv-bytes", type=int, default=8 * 2**30,
                   help="video: --kv-cache-memory-bytes (memory bounds the "
                   "batch; 0: vLLM's default)")
    p.add_argument("--video-max-model-len", type=int, default=8192)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on each load's run time; a cut load is reported "
                   "from the server's counters")
    p.add_argument("--profile-at", type=float, default=None,
                   help="profile every load this many seconds after it "
                   "starts sending (vLLM's torch profiler; traces under "
                   "<log-dir>/profiles, for trace_gaps.py; its figures are "
                   "then not a measurement)")
    p.add_argument("--profile-seconds", type=float, default=3.0,
                   help="how long the profiled window lasts")
    p.add_argument("--profile-steps", type=int, default=40,
                   help="at most this many engine steps traced")
    p.add_argument("--warmup-requests", type=int, default=16,
                   help="requests sent at once, each its own image, before "
                   "the first load: enough to reach every API server")
    p.add_argument("--health-timeout", type=float, default=420.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="serve_matrix.json",
                   help="JSON to merge results into")
    p.add_argument("--log-dir", default=None,
                   help="server and load logs (default: <out>.logs)")
    p.add_argument("--work-dir", default=None,
                   help="where model folders are written "
                   "(default: <log-dir>/models)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan's commands and exit")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of --out and exit")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    args.log_dir = Path(args.log_dir or out.with_suffix(".logs"))
    args.work_dir = Path(args.work_dir or args.log_dir / "models")
    return args


def _on_sigterm(*_):
    """Unwind (stopping the server) on the first SIGTERM; ignore more, so
    the clean-up itself is not interrupted."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_unwinds():
    """While the block runs, SIGTERM unwinds it (``_on_sigterm``); then the
    caller's handler is back (a process that calls ``main``, such as a
    test's, keeps its own)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.table_only:  # figures recomputed: today's tabulation of the runs
        if not out.exists():
            print("no results yet")
            return 0
        runs = json.loads(out.read_text())["runs"]
        for run in runs.values():
            run["figures"] = figures(run)
        print(merge(out, runs)["table"])
        return 0
    plans = plan(args)
    if args.dry_run:
        for server in plans:
            print(shlex.join(server.command(8000)))
            for load in server.loads:
                print("  ", shlex.join(
                    bench_command(server.model_dir, 8000, load, args.log_dir,
                                  "RESULT.json")
                    if load.workload in BENCH_WORKLOADS else
                    client_command(8000, load, "RESULT.json", "REQUESTS.jsonl",
                                   args.max_seconds)))
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if args.profile_at is not None:  # the runner's scopes, for trace_gaps.py
        os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    invocation = sys.argv if argv is None else [sys.argv[0], *argv]
    gpu = gpu_name()
    with sigterm_unwinds():
        failures = run_servers(args, plans, out, invocation, gpu)
    data = merge(out, {}, invocation, gpu)
    print(data["table"])
    print(f"\nresults: {out}; logs: {args.log_dir}")
    return 1 if failures else 0


def run_servers(args, plans, out: Path, invocation: list[str],
                gpu: str | None) -> int:
    """Each planned server in turn, its loads measured and merged into
    ``out`` as each ends; returns how many failed."""
    failures = 0
    for server in plans:
        port = free_port()
        name = re.sub(r"[^\w.+=-]+", "_", f"{server.model}_{server.label}")
        kv = f"_kv{server.kv_bytes}" if server.kv_bytes else ""
        stamp = datetime.datetime.now().strftime("%m%d-%H%M%S")
        log = args.log_dir / f"serve_{name}{kv}_{stamp}.log"
        print(f"== {server.model} {server.label}: starting vllm serve "
              f"(log {log})", flush=True)
        try:
            proc = start_server(server.command(port), log, port,
                                args.health_timeout)
        except (RuntimeError, TimeoutError) as exc:
            print(f"!! {exc}", flush=True)
            failures += 1
            merge(out, failed_runs(server, str(exc)), invocation, gpu)
            continue
        try:
            video = next((ld.params["image_size"] for ld in server.loads
                          if ld.workload == "video"), None)
            error = warm_up(f"http://127.0.0.1:{port}", args.seed, video,
                            args.warmup_requests)
            if error:
                print(f"!! warm-up request failed: {error}", flush=True)
            for load in server.loads:
                run = measure(server, load, port, args.log_dir,
                              args.max_seconds,
                              None if args.profile_at is None else
                              (args.profile_at, args.profile_seconds))
                run["server_log"] = str(log)
                failures += bool(run["load_error"])
                merge(out, {run["key"]: run}, invocation, gpu)
                fig = run["figures"]
                print(f"   {run['key']}: {fig['output_throughput'] or 0:.0f} "
                      f"tok/s, mean TTFT {fig['mean_ttft_ms'] or 0:.0f} ms "
                      f"(engine: queue {fig['mean_queue_ms'] or 0:.0f}, "
                      f"prefill {fig['mean_prefill_ms'] or 0:.0f}), "
                      f"peak running {fig['peak_running']}"
                      + (" (cut)" if run["cut"] else "")
                      + (f"\n!! {run['load_error']}" if run["load_error"]
                         else ""), flush=True)
        finally:
            stop_process(proc)
    return failures


if __name__ == "__main__":
    sys.exit(main())
