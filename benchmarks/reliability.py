"""Reliability checks of ``vllm serve``, stock and sparsemm side by side.

    python benchmarks/reliability.py load --out reliability.json
    python benchmarks/reliability.py faults --out reliability.json
    python benchmarks/reliability.py bad-input --out reliability.json
    python benchmarks/reliability.py table --out reliability.json

Each subcommand starts one ``vllm serve`` at a time on this GPU (stock
``--attention-backend FLASH_ATTN``, then sparsemm) on a dummy-weight model,
runs its checks against it and stops it. Every check prints one PASS/FAIL
line; each backend's record is merged into ``--out`` by key, so several
invocations build one table. The exit code is 1 when any check failed.
``--base-url`` runs against a server that is already up (served as
``model``) instead. RELIABILITY.md says what each check means.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import chat_client as cc  # noqa: E402
import serve_matrix as sm  # noqa: E402
import server_metrics as prom  # noqa: E402
import server_process as servers  # noqa: E402

COMMANDS = ("load", "faults", "bad-input")
FAULT_PARTS = ("aborts", "preempt", "restart")
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREEMPTIONS = "vllm:num_preemptions_total"  # the counter vllm:num_preemptions
SALT = {"load": 11, "probe": 12, "aborts": 13, "restart": 14, "later": 15,
        "preempt": 16, "bad": 17}
PROBE_TEXT = "Describe this image in one paragraph."
PROBE_TOKENS = 48
# text tokens besides the image that the preemption pool allows per request
QUESTION_ALLOWANCE = 64
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
FIGURES = ("completed", "errors", "disconnected", "output_throughput",
           "p50_e2el_ms", "p99_e2el_ms")
RATIO_FIGURES = ("output_throughput", "p50_e2el_ms", "p99_e2el_ms")


# ---------------------------------------------------------------- workloads

def pick(rng, n: int, share: float) -> np.ndarray:
    """Exactly round(n * share) of n positions, at random: shares are exact,
    not merely expected."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:round(n * share)]] = True
    return mask


def filler(seed: int, chars: int) -> str:
    """At least ``chars`` characters of plain question text."""
    text, n = "", max(16, chars // 40)
    while len(text) < chars:
        text = " ".join(cc.make_questions(n, seed))
        n *= 2
    return text


def load_workload(num_requests: int, seed: int = 0, num_images: int = 32,
                  unique_share: float = 0.25, stream_share: float = 0.5,
                  text_only_share: float = 0.1, disconnect_share: float = 0.2,
                  long_share: float = 0.5, max_tokens=(16, 512),
                  long_chars=(300, 1500), disconnect_chunks=(1, 8),
                  size=(336, 336), salt: str = "load") -> list[cc.ChatRequest]:
    """The mixed load, the same list for the same seed.

    Image requests take one of ``num_images`` shared images (prefix-cache
    hits for stock) or, ``unique_share`` of them, a fresh one. Long
    questions carry ``long_chars`` more characters of context. Every request
    asks for ``max_tokens`` drawn uniformly with ``ignore_eos``, so its
    answer length is known; ``disconnect_share`` of the streaming ones close
    the connection after ``disconnect_chunks`` chunks (fewer than they asked
    for).
    """
    rng = np.random.default_rng([seed, SALT[salt]])
    n = num_requests
    stream = pick(rng, n, stream_share)
    text_only = pick(rng, n, text_only_share)
    long, unique = pick(rng, n, long_share), pick(rng, n, unique_share)
    drop, streams = np.zeros(n, dtype=bool), np.flatnonzero(stream)
    drop[streams[pick(rng, len(streams), disconnect_share)]] = True
    tokens = rng.integers(max_tokens[0], max_tokens[1] + 1, n)
    chunks = rng.integers(disconnect_chunks[0], disconnect_chunks[1] + 1, n)
    extra = rng.integers(long_chars[0], long_chars[1] + 1, n)
    corpus = filler(seed + SALT[salt], 2 * long_chars[1] + 1)
    offsets = rng.integers(0, len(corpus) - long_chars[1], n)
    images = rng.integers(0, num_images, n)
    pool = [cc.image_url([seed, SALT[salt], j], size)
            for j in range(num_images)]
    requests = []
    for i, question in enumerate(cc.make_questions(n, seed)):
        if long[i]:
            question += " Context: " + corpus[offsets[i]:offsets[i] + extra[i]]
        if text_only[i]:
            url, image = None, None
        elif unique[i]:
            url = cc.image_url([seed, SALT[salt], num_images + i], size)
            image = f"unique-{i}"
        else:
            url, image = pool[images[i]], int(images[i])
        k = max(1, min(int(chunks[i]), int(tokens[i]) - 1)) \
            if drop[i] else None
        requests.append(cc.ChatRequest(
            messages=[cc.user_turn(url, question)], max_tokens=int(tokens[i]),
            stream=bool(stream[i]), disconnect_after=k,
            tag={"index": i, "image": image, "long": bool(long[i]),
                 "max_tokens": int(tokens[i])}))
    return requests


def abort_workload(num_requests: int, seed: int = 0, size=(336, 336),
                   early_share: float = 1 / 3, max_chunks: int = 16,
                   max_tokens=(64, 256), max_delay: float = 0.3):
    """Streams to drop: ``early_share`` of them as soon as the server accepts
    them (before any token: queued or in prefill, where sparsemm compacts),
    after a random ``delay`` up to ``max_delay`` s; the rest after 1 to
    ``max_chunks`` chunks. Returns (dropped after chunks, dropped early)."""
    requests = load_workload(num_requests, seed, num_images=8,
                             stream_share=1.0, disconnect_share=1.0,
                             max_tokens=max_tokens,
                             disconnect_chunks=(1, max_chunks), size=size,
                             salt="aborts")
    rng = np.random.default_rng([seed, SALT["aborts"], len(requests)])
    early, delays = pick(rng, len(requests), early_share), rng.random(
        len(requests)) * max_delay
    for request, delay in zip(requests, delays):
        request.tag["delay"] = float(delay)
    return ([q for q, e in zip(requests, early) if not e],
            [dataclasses.replace(q, disconnect_after=None)
             for q, e in zip(requests, early) if e])


def png_url(width: int, height: int, seed: int | None = None) -> str:
    """A PNG data URL: noise from ``seed``, or one flat colour (an
    8000x8000 one stays small)."""
    if seed is not None:
        return cc.image_url(seed, (width, height), "PNG")
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(
        buffer.getvalue()).decode()


def corrupt_png_url(seed: int, size: int = 2048) -> str:
    data = np.random.default_rng([seed, SALT["bad"]]).bytes(size)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def prompt_of_length(count, target: int, corpus: str,
                     attempts: int = 8) -> str:
    """Text whose whole prompt (chat template included) is ``target`` tokens
    by ``count(text)``.

    Token counts grow with the text, so a binary search finds the shortest
    prefix of ``corpus`` that reaches the target; when a merge of tokens
    skips past it, the corpus is tried from a later character.
    """
    if count("") > target:
        raise ValueError(f"the chat template alone is {count('')} tokens, "
                         f"more than {target}")
    for start in range(attempts):
        text = corpus[start:]
        while count(text) < target:
            if len(text) > 64 * (target + len(corpus)):
                raise ValueError(f"no text reaches {target} tokens")
            text += " " + text
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi) // 2
            if count(text[:mid]) >= target:
                hi = mid
            else:
                lo = mid + 1
        if count(text[:lo]) == target:
            return text[:lo]
    raise ValueError(f"no prefix of the corpus is exactly {target} tokens")


# -------------------------------------------------------------- model shape

def kv_bytes_per_token(config: dict) -> int:
    """K and V of every layer and KV head for one token, in the model's dtype
    (LLaVA-1.5-7B in fp16: 512 KiB)."""
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    dtype = text.get("torch_dtype") or config.get("torch_dtype") or "float16"
    return (text["num_hidden_layers"] * kv_heads * head_dim * 2
            * DTYPE_BYTES[dtype])


def image_tokens(config: dict) -> int | None:
    """Placeholder tokens of one LLaVA-1.5 image (one per patch); None for
    other layouts (tiles, merged patches), where one per patch is wrong."""
    if config.get("model_type") != "llava":
        return None
    vision = config["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def preempt_kv_bytes(config: dict, fit: int, max_tokens: int) -> int | None:
    """A pool for about ``fit`` one-image requests at their full length:
    fewer than the preemption load runs at once, so vLLM has to preempt.
    None where the image's tokens are not known."""
    image = image_tokens(config)
    if image is None:
        return None
    per_request = image + QUESTION_ALLOWANCE + max_tokens
    return fit * per_request * kv_bytes_per_token(config)


# ------------------------------------------------------------------- checks

@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self, title: str) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {title} {self.name}: " \
               f"{self.detail}"


class Verdicts:
    """One record's checks, each printed as it is made."""

    def __init__(self, title: str):
        self.title, self.checks = title, []

    def add(self, check: Check, part: str = "") -> Check:
        if part:
            check.name = f"{part}: {check.name}"
        self.checks.append(check)
        print(check.line(self.title), flush=True)
        return check

    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


def _examples(items: list, limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(str(x) for x in items[:limit]) + more


def check_tokens(requests, results, name: str = "token counts") -> Check:
    """Every request that ran to its end got exactly its ``max_tokens``
    (``ignore_eos``), by the server's own usage count."""
    wrong, finished = [], 0
    for request, result in zip(requests, results):
        if not result.ok or result.disconnected:
            continue  # failures and cuts have checks of their own
        finished += 1
        if not result.usage or result.completion_tokens != request.max_tokens:
            wrong.append(f"#{request.tag.get('index')} got "
                         f"{result.completion_tokens} of {request.max_tokens}"
                         + ("" if result.usage else " (no usage)"))
    if wrong:
        return Check(name, False, f"{len(wrong)} of {finished} wrong: "
                     + _examples(wrong))
    return Check(name, finished > 0, f"{finished} finished requests, each "
                 "exactly its max_tokens" if finished else "none finished")


def check_errors(results, name: str = "errors") -> Check:
    """No answer other than HTTP 200, no exception, no broken stream."""
    failed = [r for r in results if r.sent and not r.ok and not r.cut]
    counts = collections.Counter(r.error for r in failed).most_common(5)
    return Check(name, not failed, f"{len(failed)} failed of "
                 f"{sum(r.sent for r in results)} sent"
                 + (": " + _examples([f"{n}x {e}" for e, n in counts])
                    if failed else ""))


def check_finished(results, name: str = "all sent and finished") -> Check:
    """Nothing cut by --max-seconds: a cut request proves nothing."""
    cut = sum(r.cut for r in results)
    return Check(name, not cut, f"{cut} of {len(results)} cut by "
                 "--max-seconds (raise it or send fewer)" if cut
                 else f"{len(results)} requests")


def check_pool(before: float | None, after: float | None,
               tolerance: float = 0.0) -> Check:
    """KV usage at rest is the same after the load as before it.

    At rest every block is free, cached prefix blocks included (vLLM counts
    them as free), so the gauge is the same number both times and any
    difference beyond ``tolerance`` is blocks not given back."""
    if before is None or after is None:
        return Check("KV pool back to start", False,
                     f"{KV_USAGE} missing from /metrics")
    return Check("KV pool back to start", abs(after - before) <= tolerance,
                 f"{KV_USAGE} {before:.6f} before, {after:.6f} after "
                 f"(tolerance {tolerance:g})")


def check_probe(before, after) -> Check:
    """The same greedy request answers the same text before and after."""
    for when, result in (("before", before), ("after", after)):
        if not result.ok or result.completion_tokens != PROBE_TOKENS:
            got = result.error or (f"{result.completion_tokens} of "
                                   f"{PROBE_TOKENS} tokens")
            return Check("probe unchanged", False, f"probe {when}: {got}")
    same = before.text == after.text
    return Check("probe unchanged", same, "identical answer" if same else
                 f"answers differ: {before.text[:60]!r} / {after.text[:60]!r}")


def check_idle(reached: bool, timeout: float) -> Check:
    return Check("idle", reached, f"{RUNNING} and {WAITING} at 0" if reached
                 else f"requests still running or waiting after {timeout:g} s")


def check_preemptions(before: dict, after: dict) -> Check:
    a, b = prom.total(after, PREEMPTIONS), prom.total(before, PREEMPTIONS)
    if a is None:
        return Check("preempted", False,
                     f"{PREEMPTIONS} missing from /metrics")
    return Check("preempted", a - (b or 0) > 0,
                 f"{PREEMPTIONS} rose by {a - (b or 0):g}")


def check_case(case: dict) -> Check:
    """A bad input gets a 4xx with a message or a correct answer; never a
    5xx, no answer, or a dead server."""
    status, name = case["status"], case["name"]
    if not case["alive"]:
        return Check(name, False, f"server down after it (HTTP {status})")
    if status is None:
        return Check(name, False, f"no answer: {case['message']}")
    if 400 <= status < 500:
        said = re.sub(r"^HTTP \d+: ", "", case["message"] or "").strip()
        return Check(name, bool(said), f"rejected: {case['message']}" if said
                     else f"HTTP {status} without a message")
    if status != 200:
        return Check(name, False, case["message"] or f"HTTP {status}")
    problems = []
    if case["completion_tokens"] != case["max_tokens"]:
        problems.append(f"{case['completion_tokens']} of {case['max_tokens']} "
                        "tokens")
    if case.get("prompt_tokens_expected") not in (None, case["prompt_tokens"]):
        problems.append(f"prompt {case['prompt_tokens']} tokens, built for "
                        f"{case['prompt_tokens_expected']}")
    return Check(name, not problems, "; ".join(problems) or
                 f"answered: {case['prompt_tokens']} prompt tokens, "
                 f"{case['completion_tokens']} out")


def check_startup_failure(name: str, outcome: dict, timeout: float) -> Check:
    """A bad setting stops ``vllm serve`` with an error line naming it."""
    code, line = outcome["code"], outcome["line"]
    if code is None:
        return Check(name, False, f"still running after {timeout:g} s")
    if code == 0:
        return Check(name, False, "exited with code 0")
    if line is None:
        return Check(name, False, f"exit code {code}, but no error line "
                     f"naming {outcome['needle']!r} in its log's last lines")
    return Check(name, True, f"exit code {code} after {outcome['seconds']:.0f}"
                 f" s: {line}")


# ------------------------------------------------------------------ servers

@dataclass
class Context:
    """The model every server of this invocation serves."""
    name: str
    folder: Path | None
    config: dict = field(default_factory=dict)


@dataclass
class Server:
    base: str
    proc: subprocess.Popen | None = None  # None: not ours (--base-url)
    cmd: list[str] | None = None
    port: int | None = None


def server_command(args, ctx: Context, backend: sm.Backend, port: int,
                   kv_bytes: int | None = None) -> list[str]:
    return sm.serve_command(
        ctx.folder, port, args.max_model_len,
        backend.server_args(sm.sparsemm_defaults(ctx.folder)), kv_bytes,
        shlex.split(args.server_args))


def log_file(args, *words) -> Path:
    stamp = datetime.datetime.now().strftime("%m%d-%H%M%S")
    name = re.sub(r"[^\w.+=-]+", "_", "_".join(map(str, words)))
    return args.log_dir / f"{name}_{stamp}.log"


@contextlib.contextmanager
def serving(args, ctx: Context, backend: sm.Backend, tag: str,
            kv_bytes: int | None = None):
    """A started ``vllm serve`` (or the --base-url one), stopped on exit."""
    if args.base_url:
        yield Server(args.base_url.rstrip("/"))
        return
    port = servers.free_port()
    cmd = server_command(args, ctx, backend, port, kv_bytes)
    log = log_file(args, "serve", tag, ctx.name, backend.label)
    print(f"== {tag} {backend.label}: starting vllm serve (log {log})",
          flush=True)
    proc = servers.start_server(cmd, log, port, args.health_timeout)
    try:
        yield Server(f"http://127.0.0.1:{port}", proc, cmd, port)
    finally:
        servers.stop_process(proc)


def alive(server: Server) -> bool:
    if server.proc is not None and server.proc.poll() is not None:
        return False
    try:
        prom.http_get(server.base + "/health", timeout=10)
        return True
    except OSError:
        return False


def post_json(url: str, body: dict, timeout: float = 60.0):
    """(status, parsed JSON or {"text": body}) of a POST; HTTP errors too."""
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"text": exc.read().decode(errors="replace")}


def tokenizer_counter(base: str):
    """``count(text)``: prompt tokens of a one-message text chat, by the
    server's own ``/tokenize`` (chat template included), and max_model_len."""
    def count(text: str) -> int:
        status, data = post_json(base + "/tokenize", {
            "model": sm.SERVED_NAME,
            "messages": [{"role": "user", "content": text}]})
        if status != 200:
            raise RuntimeError(f"/tokenize answered {status}: {data}")
        return data["count"]

    status, data = post_json(base + "/tokenize", {
        "model": sm.SERVED_NAME,
        "messages": [{"role": "user", "content": ""}]})
    if status != 200:
        raise RuntimeError(f"/tokenize answered {status}: {data}")
    return count, data["max_model_len"]


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def is_idle(metrics: dict) -> bool:
    running = prom.total(metrics, RUNNING)
    waiting = prom.total(metrics, WAITING)
    return running == 0 and waiting == 0


def probe_request(seed: int) -> cc.ChatRequest:
    """The fixed greedy probe. A fresh ``cache_salt`` keeps it off the prefix
    cache, so both runs compute the whole prompt the same way."""
    return cc.ChatRequest(
        messages=[cc.user_turn(cc.image_url([seed, SALT["probe"]]),
                               PROBE_TEXT)],
        max_tokens=PROBE_TOKENS, stream=False, temperature=0.0,
        extra_body={"cache_salt": f"probe-{uuid.uuid4().hex}"},
        tag={"probe": True})


def send_one(base: str, request: cc.ChatRequest,
             max_seconds: float | None = None) -> cc.ChatResult:
    results, _ = asyncio.run(cc.run_requests(base, sm.SERVED_NAME, [request],
                                             1, max_seconds))
    return results[0]


@dataclass
class Rest:
    """The server at rest: the probe's answer and the gauges after it."""
    idle: bool
    kv_usage: float | None
    probe: cc.ChatResult
    metrics: dict


def at_rest(server: Server, args) -> Rest:
    """Idle, the probe, idle again, then /metrics. vLLM sets its gauges when
    it steps, so the probe's own step makes them current."""
    wait_for(lambda: is_idle(prom.scrape(server.base)), args.idle_timeout)
    result = send_one(server.base, probe_request(args.seed), args.max_seconds)
    idle = wait_for(lambda: is_idle(prom.scrape(server.base)),
                    args.idle_timeout)
    metrics = prom.scrape(server.base)
    return Rest(idle, prom.total(metrics, KV_USAGE), result, metrics)


def rest_checks(v: Verdicts, before: Rest, after: Rest, args,
                part: str = "") -> None:
    v.add(check_idle(after.idle, args.idle_timeout), part)
    v.add(check_pool(before.kv_usage, after.kv_usage, args.kv_tolerance), part)
    v.add(check_probe(before.probe, after.probe), part)


def run_load_requests(server: Server, requests, concurrency: int,
                      max_seconds: float | None, give_up=None):
    return asyncio.run(cc.run_requests(server.base, sm.SERVED_NAME, requests,
                                       concurrency, max_seconds,
                                       give_up=give_up))


def save_requests(args, key: str, requests, results) -> str:
    """Every request's record (answer text left out) as JSON lines."""
    path = args.log_dir / (re.sub(r"[^\w.+=-]+", "_", key) + ".requests.jsonl")
    with open(path, "w") as f:
        for request, result in zip(requests, results):
            record = dataclasses.asdict(result)
            record.pop("text")
            record.update(max_tokens=request.max_tokens,
                          disconnect_after=request.disconnect_after)
            f.write(json.dumps(record) + "\n")
    return str(path)


def figures(summary: dict) -> dict:
    return {"completed": summary["completed"], "errors": summary["failed"],
            "disconnected": summary["disconnected"],
            "output_throughput": summary["output_throughput"],
            "p50_e2el_ms": summary["p50_e2el_ms"],
            "p99_e2el_ms": summary["p99_e2el_ms"]}


# --------------------------------------------------------------------- load

def run_load(args, ctx: Context, backend: sm.Backend, v: Verdicts,
             record: dict) -> None:
    requests = load_workload(
        args.num_requests, args.seed, args.num_images, args.unique_share,
        args.stream_share, args.text_only_share, args.disconnect_share,
        args.long_share, sm.ints(args.max_tokens_range),
        size=cc.parse_size(args.image_size))
    record["workload"] = {
        "requests": len(requests), "concurrency": args.concurrency,
        "streaming": sum(q.stream for q in requests),
        "text_only": sum(q.tag["image"] is None for q in requests),
        "planned_disconnects": sum(q.disconnect_after is not None
                                   for q in requests),
        "shared_image_requests": sum(isinstance(q.tag["image"], int)
                                     for q in requests)}
    with serving(args, ctx, backend, "load") as server:
        record["serve_cmd"] = server.cmd
        record["warm_up_error"] = sm.warm_up(server.base, args.seed)
        before = at_rest(server, args)
        results, duration = run_load_requests(server, requests,
                                              args.concurrency,
                                              args.max_seconds)
        after = at_rest(server, args)
    summary = cc.summarize(results, duration)
    record.update(summary=summary, figures=figures(summary),
                  server=prom.server_delta(before.metrics, after.metrics),
                  requests_log=save_requests(args, record["key"], requests,
                                             results))
    v.add(check_finished(results))
    v.add(check_errors(results))
    v.add(check_tokens(requests, results))
    rest_checks(v, before, after, args)


# ------------------------------------------------------------------- faults

async def drop_early(base: str, requests, concurrency: int) -> list[dict]:
    """POST each stream and close it once the response headers are in (after
    its tag's ``delay``): the server holds the request, no token came back."""
    import aiohttp
    url, gate = base + "/v1/chat/completions", asyncio.Semaphore(concurrency)

    async def one(session, request):
        async with gate:
            try:
                async with session.post(url, json=request.body(
                        sm.SERVED_NAME)) as response:
                    if response.status != 200:
                        return {"status": response.status,
                                "error": (await response.text())[:300]}
                    await asyncio.sleep(request.tag["delay"])
                    response.close()
                    return {"status": 200, "error": None}
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return {"status": None,
                        "error": f"{type(exc).__name__}: {exc}"}

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await asyncio.gather(*(one(session, q) for q in requests))


async def abort_storm(base: str, chunked, early, concurrency: int,
                      max_seconds: float | None):
    """Both kinds of drop at once, half the concurrency each."""
    half = max(1, concurrency // 2)
    (results, _), dropped = await asyncio.gather(
        cc.run_requests(base, sm.SERVED_NAME, chunked, half, max_seconds),
        drop_early(base, early, half))
    return results, dropped


def later_requests(server: Server, args, v: Verdicts, part: str) -> None:
    """Ordinary requests after the fault all complete, token counts exact."""
    requests = load_workload(args.later_requests, args.seed, num_images=4,
                             disconnect_share=0.0, max_tokens=(16, 64),
                             long_chars=(100, 400),
                             size=cc.parse_size(args.image_size),
                             salt="later")
    results, _ = run_load_requests(server, requests, len(requests),
                                   args.max_seconds)
    checks = (check_finished(results), check_errors(results),
              check_tokens(requests, results))
    failed = [c.detail for c in checks if not c.ok]
    v.add(Check("later requests complete", not failed, "; ".join(failed)
                or checks[-1].detail), part)


def aborts_part(args, server: Server, v: Verdicts) -> dict:
    chunked, early = abort_workload(args.abort_requests, args.seed,
                                    cc.parse_size(args.image_size),
                                    max_chunks=args.abort_max_chunks,
                                    max_delay=args.abort_delay)
    before = at_rest(server, args)
    results, dropped = asyncio.run(abort_storm(
        server.base, chunked, early, args.abort_concurrency, args.max_seconds))
    after = at_rest(server, args)
    bad = [f"#{q.tag['index']}: "
           + (r.error or ("cut" if r.cut else "ran to its end"))
           for q, r in zip(chunked, results) if not (r.ok and r.disconnected)]
    bad += [f"#{q.tag['index']} (early): {d['error'] or d['status']}"
            for q, d in zip(early, dropped) if d["status"] != 200]
    v.add(Check("streams dropped cleanly", not bad,
                f"{len(chunked)} after 1-{args.abort_max_chunks} chunks, "
                f"{len(early)} right after acceptance"
                + (f"; {len(bad)} failed: {_examples(bad)}" if bad else "")),
          "aborts")
    rest_checks(v, before, after, args, "aborts")
    later_requests(server, args, v, "aborts")
    return {"dropped_after_chunks": len(chunked),
            "dropped_early": len(early), "failed": bad,
            "server": prom.server_delta(before.metrics, after.metrics)}


def preempt_part(args, server: Server, v: Verdicts) -> dict:
    requests = load_workload(args.preempt_requests, args.seed,
                             unique_share=1.0,  # no prefix blocks shared
                             text_only_share=0.0, disconnect_share=0.0,
                             long_share=0.0,
                             max_tokens=(args.preempt_max_tokens,) * 2,
                             size=cc.parse_size(args.image_size),
                             salt="preempt")
    before = at_rest(server, args)
    results, duration = run_load_requests(server, requests,
                                          len(requests), args.max_seconds)
    after = at_rest(server, args)
    v.add(check_preemptions(before.metrics, after.metrics), "preempt")
    v.add(check_finished(results), "preempt")
    v.add(check_errors(results), "preempt")
    v.add(check_tokens(requests, results), "preempt")
    rest_checks(v, before, after, args, "preempt")
    summary = cc.summarize(results, duration)
    return {"summary": summary, "figures": figures(summary),
            "server": prom.server_delta(before.metrics, after.metrics)}


def family(pid: int) -> list[int]:
    """The process and every descendant, which a setsid child would leave
    out of the process group."""
    import psutil
    try:
        return [pid] + [p.pid for p in psutil.Process(pid).children(
            recursive=True)]
    except psutil.Error:
        return [pid]


def still_alive(pids) -> list[int]:
    import psutil
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.Error:
            pass
    return left


def wait_exit(proc: subprocess.Popen, seconds: float) -> int | None:
    """The exit code, or None if still running after ``seconds``."""
    try:
        return proc.wait(max(0.0, seconds))
    except subprocess.TimeoutExpired:
        return None


def restart_part(args, server: Server, v: Verdicts) -> dict:
    """SIGTERM to the server's main process mid-load (as a container stop
    sends it); it must exit cleanly, its children with it, and the same
    command must serve again on the same port. vLLM keeps its HTTP server
    up while a stream it will not finish is open (stock too), so the
    clients hang up ``--client-patience`` s after the signal, as clients
    with a timeout do."""
    requests = load_workload(args.restart_requests, args.seed, num_images=8,
                             stream_share=1.0, disconnect_share=0.0,
                             max_tokens=(256, 512),
                             size=cc.parse_size(args.image_size),
                             salt="restart")
    load: list = []
    give_up = threading.Event()
    thread = threading.Thread(daemon=True, target=lambda: load.append(
        run_load_requests(server, requests, args.restart_concurrency,
                          args.max_seconds, give_up)))
    thread.start()
    busy = wait_for(
        lambda: (prom.total(prom.scrape(server.base), RUNNING) or 0) > 0,
        args.idle_timeout)
    time.sleep(args.restart_after)
    running = prom.total(prom.scrape(server.base), RUNNING)
    members = family(server.proc.pid)
    os.kill(server.proc.pid, signal.SIGTERM)
    started = time.monotonic()
    code = wait_exit(server.proc, min(args.client_patience,
                                      args.shutdown_timeout))
    hung_up = code is None  # vLLM waits for the streams it still holds open
    give_up.set()
    if code is None:
        code = wait_exit(server.proc, args.shutdown_timeout
                         - (time.monotonic() - started))
    seconds = time.monotonic() - started
    # its children get what is left of the timeout to follow it
    servers._wait_group(server.proc, max(1.0, args.shutdown_timeout - seconds))
    left = sorted(set(servers.group_members(server.proc.pid))
                  | set(still_alive(members)))
    thread.join(args.shutdown_timeout)
    servers.stop_process(server.proc, grace=10)
    if code is None:
        detail = f"still running after {args.shutdown_timeout:g} s"
    else:
        detail = f"exit code {code} after {seconds:.1f} s"
    if hung_up:
        detail += (f" (open streams held it until the clients hung up at "
                   f"{args.client_patience:g} s)")
    detail += (f", {running or 0:g} requests running when sent" if busy
               else "; no request was running when sent")
    v.add(Check("SIGTERM under load", code == 0 and busy, detail), "restart")
    v.add(Check("no orphan processes", not left, f"left alive: {left}"
                if left else f"all {len(members)} processes gone"), "restart")
    outcome = {"exit_code": code, "exit_seconds": seconds, "left": left,
               "running_at_sigterm": running, "held_by_open_streams": hung_up,
               "load": cc.summarize(*load[0]) if load else None}
    log = log_file(args, "serve", "restart", server.port)
    try:
        proc = servers.start_server(server.cmd, log, server.port,
                               args.health_timeout)
    except (RuntimeError, TimeoutError) as exc:
        v.add(Check("serves again on the same port", False,
                    str(exc).splitlines()[0]), "restart")
        return outcome
    try:
        result = send_one(f"http://127.0.0.1:{server.port}",
                          probe_request(args.seed), args.max_seconds)
    finally:
        servers.stop_process(proc)
    ok = result.ok and result.completion_tokens == PROBE_TOKENS
    v.add(Check("serves again on the same port", ok, "probe answered" if ok
                else f"probe failed: {result.error}"), "restart")
    return outcome


def faults_server(args, ctx: Context, backend: sm.Backend, parts: list[str]):
    """The faults server: a small KV pool when the preemption part runs, and
    for sparsemm the --preempt-sparsemm-config settings. Returns (backend,
    KV bytes or None)."""
    kv_bytes = None
    if "preempt" in parts or args.kv_cache_memory_bytes:
        try:
            kv_bytes = args.kv_cache_memory_bytes or preempt_kv_bytes(
                ctx.config, args.preempt_fit, args.preempt_max_tokens)
        except KeyError as exc:
            raise RuntimeError(f"{ctx.folder}/config.json lacks {exc}: give "
                               "--kv-cache-memory-bytes") from None
        if kv_bytes is None:
            raise RuntimeError(
                f"{ctx.folder}/config.json is model type "
                f"{ctx.config.get('model_type')!r}, whose image tokens the "
                "pool estimate does not know (LLaVA-1.5's only): give "
                "--kv-cache-memory-bytes")
    if backend.name == "sparsemm":
        backend = dataclasses.replace(backend, settings=json.dumps(
            {**json.loads(backend.settings),
             **json.loads(args.preempt_sparsemm_config)}, sort_keys=True))
    return backend, kv_bytes


def run_faults(args, ctx: Context, backend: sm.Backend, v: Verdicts,
               record: dict) -> None:
    """Every part on one server, in the order aborts, preempt, restart (the
    last one stops it)."""
    parts = [p for p in FAULT_PARTS if p in args.parts.split(",")]
    kv_bytes = None
    if args.base_url:
        skipped = [p for p in parts if p != "aborts"]
        parts = [p for p in parts if p == "aborts"]
        if skipped:
            print(f"-- {skipped} need a server of their own: skipped with "
                  "--base-url", flush=True)
    else:
        backend, kv_bytes = faults_server(args, ctx, backend, parts)
    record.update(parts=parts, kv_cache_memory_bytes=kv_bytes,
                  server_label=backend.label)
    with serving(args, ctx, backend, "faults", kv_bytes) as server:
        record["serve_cmd"] = server.cmd
        record["warm_up_error"] = sm.warm_up(server.base, args.seed)
        if "aborts" in parts:
            record["aborts"] = aborts_part(args, server, v)
        if "preempt" in parts:
            record["preempt"] = preempt_part(args, server, v)
            record["figures"] = record["preempt"]["figures"]
        if "restart" in parts:
            record["restart"] = restart_part(args, server, v)


# ---------------------------------------------------------------- bad input

def bad_cases(args, count, max_model_len: int) -> list[tuple]:
    """(name, request, prompt tokens it was built for) for every bad input."""
    window = args.window
    if window is None:
        from vllm_sparsemm.engine.config import SparseMMSettings
        window = SparseMMSettings.window
    question = "Describe the image."
    image = cc.image_url([args.seed, SALT["bad"]],
                         cc.parse_size(args.image_size))

    def ask(url, text=question, max_tokens=16, xargs=None):
        return cc.ChatRequest([cc.user_turn(url, text)], max_tokens=max_tokens,
                              stream=False, vllm_xargs=xargs)

    huge = cc.parse_size(args.huge_image_size)
    cases = [("corrupt image", ask(corrupt_png_url(args.seed)), None),
             ("1x1 image", ask(png_url(1, 1, seed=[args.seed, 1])), None),
             (f"{huge[0]}x{huge[1]} image", ask(png_url(*huge)), None)]
    corpus = filler(args.seed + SALT["bad"], 4 * max_model_len)
    for label, target, max_tokens in (
            ("W", window, 16), ("B", args.budget, 16),
            ("B+1", args.budget + 1, 16),
            ("max_model_len-1", max_model_len - 1, 1)):
        name = f"prompt of {label}={target} tokens"
        try:
            text = prompt_of_length(count, target, corpus)
        except ValueError as exc:
            cases.append((name, None, str(exc)))
            continue
        cases.append((name, ask(None, text, max_tokens), target))
    cases.append(("empty prompt", ask(None, ""), None))
    for xargs in ({"sparsemm_budget": -5}, {"sparsemm_budget": "x"},
                  {"sparsemm_bogus": 1}):
        cases.append((f"vllm_xargs {json.dumps(xargs)}",
                      ask(image, xargs=xargs), None))
    return cases


def run_bad_input(args, ctx: Context, backend: sm.Backend, v: Verdicts,
                  record: dict) -> None:
    record["cases"] = []
    with serving(args, ctx, backend, "bad-input") as server:
        record["serve_cmd"] = server.cmd
        record["warm_up_error"] = sm.warm_up(server.base, args.seed)
        before = send_one(server.base, probe_request(args.seed),
                          args.max_seconds)
        count, max_model_len = tokenizer_counter(server.base)
        for name, request, expected in bad_cases(args, count, max_model_len):
            if request is None:  # no prompt of that length could be built
                v.add(Check(name, False, f"not built: {expected}"))
                continue
            result = send_one(server.base, request, args.max_seconds)
            case = {"name": name, "status": result.http_status,
                    "message": result.error, "ok": result.ok,
                    "max_tokens": request.max_tokens,
                    "prompt_tokens": result.prompt_tokens,
                    "prompt_tokens_expected": expected,
                    "completion_tokens": result.completion_tokens,
                    "alive": alive(server)}
            record["cases"].append(case)
            v.add(check_case(case))
            if not case["alive"]:
                break
        after = send_one(server.base, probe_request(args.seed),
                         args.max_seconds)
        v.add(check_probe(before, after))


def bad_startups(args, ctx: Context, budget: int) -> list[tuple]:
    """(name, sparsemm settings, word its error line must name)."""
    scores = args.work_dir / "bad_scores.json"
    scores.parent.mkdir(parents=True, exist_ok=True)
    scores.write_text('{"scores": [[0.5, 0.25], ')
    defaults = sm.sparsemm_defaults(ctx.folder)
    return [("bad score file", {"budget": budget, "head_scores": str(scores)},
             scores.name),
            ("budget 5", {**defaults, "budget": 5}, "budget"),
            ("misspelt setting budgte", {**defaults, "budgte": 64}, "budgte")]


def error_line(log: Path, needle: str, lines: int = 60) -> str | None:
    """The last line among the log's last ``lines`` (the command line
    excepted) that reports an error and names ``needle``."""
    text = Path(log).read_text(errors="replace").splitlines()[1:]
    for line in reversed(text[-lines:]):
        if needle.lower() in line.lower() and re.search(
                r"error|exception|invalid", line, re.IGNORECASE):
            return line.strip()
    return None


def failed_start(cmd: list[str], log: Path, timeout: float,
                 needle: str) -> dict:
    """Run a ``vllm serve`` that must refuse to start."""
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        proc = servers.spawn(cmd, f)
    started = time.monotonic()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        servers.stop_process(proc, grace=10)
    return {"code": code, "seconds": time.monotonic() - started,
            "needle": needle, "line": error_line(log, needle),
            "log": str(log), "cmd": cmd}


def startup_command(args, ctx: Context, settings: dict,
                    port: int) -> list[str]:
    return sm.serve_command(
        ctx.folder, port, args.max_model_len,
        ["--attention-backend", "sparsemm", "--additional-config",
         json.dumps({"sparsemm": settings})],
        extra_args=shlex.split(args.server_args))


def run_startup_errors(args, ctx: Context, v: Verdicts, record: dict) -> None:
    record["startups"] = []
    for name, settings, needle in bad_startups(args, ctx, args.budget):
        cmd = startup_command(args, ctx, settings, servers.free_port())
        print(f"== start-up error: {name}", flush=True)
        outcome = failed_start(cmd, log_file(args, "serve", "startup", name),
                               args.startup_timeout, needle)
        outcome["name"] = name
        record["startups"].append(outcome)
        v.add(check_startup_failure(name, outcome, args.startup_timeout))


# ------------------------------------------------------------------ results

RUNNERS = {"load": run_load, "faults": run_faults, "bad-input": run_bad_input}


def run_record(args, ctx: Context, label: str, runner) -> dict:
    """Run one backend's (or the start-up errors') checks into a record; a
    server that does not start is a failed check, not a crash."""
    key = f"{args.command}/{ctx.name}/{label}"
    v = Verdicts(key)
    record = {"key": key, "command": args.command, "model": ctx.name,
              "label": label, "backend": label.split("-")[0],
              "budget": None if label == "stock" else args.budget,
              "base_url": args.base_url,
              "finished_at": None}
    try:
        runner(v, record)
    except (RuntimeError, TimeoutError, OSError) as exc:  # e.g. no server
        first = (str(exc).splitlines() or [""])[0]
        v.add(Check("ran", False, f"{type(exc).__name__}: {first}"))
        record["error"] = str(exc)
    record.update(checks=[dataclasses.asdict(c) for c in v.checks],
                  passed=v.passed(), finished_at=datetime.datetime.now()
                  .isoformat(timespec="seconds"))
    return record


def compute_ratios(runs: dict) -> dict:
    """Each sparsemm figure over stock's, for the same subcommand, model and
    workload."""
    ratios = {}
    for key, run in runs.items():
        stock = runs.get(f"{run['command']}/{run['model']}/stock")
        if run["backend"] != "sparsemm" or not stock \
                or stock.get("workload") != run.get("workload"):
            continue  # no stock run of the same workload
        mine, theirs = run.get("figures") or {}, stock.get("figures") or {}
        if not mine or not theirs:
            continue
        ratios[key] = sm.figure_ratios(mine, theirs, RATIO_FIGURES)
    return ratios


def table(runs: dict, ratios: dict) -> str:
    """Markdown: a row per record; sparsemm's load figures carry their ratio
    to stock's. Failed checks are listed under the table."""
    formats = {"completed": "{:d}", "errors": "{:d}", "disconnected": "{:d}",
               "output_throughput": "{:.0f}", "p50_e2el_ms": "{:.0f}",
               "p99_e2el_ms": "{:.0f}"}
    lines = ["| subcommand | model | backend | checks | completed | errors | "
             "disconnected | out tok/s | p50 e2e ms | p99 e2e ms |",
             "|" + "---|" * 10]
    failures = []
    order = {c: i for i, c in enumerate(COMMANDS)}
    for run in sorted(runs.values(), key=lambda r: (
            order.get(r["command"], 9), r["model"], r["label"] != "stock",
            r["label"])):
        checks, fig = run["checks"], run.get("figures") or {}
        ratio = ratios.get(run["key"], {})
        passed = sum(c["ok"] for c in checks)
        cells = [sm._cell(fig.get(f), formats[f], ratio.get(f))
                 for f in FIGURES]
        lines.append(f"| {run['command']} | {run['model']} | {run['label']} | "
                     f"{passed}/{len(checks)} | " + " | ".join(cells) + " |")
        failures += [f"FAIL {run['key']} {c['name']}: {c['detail']}"
                     for c in checks if not c["ok"]]
    return "\n".join(lines + ([""] + failures if failures else []))


def merge_runs(path: Path, new_runs: dict, invocation=None) -> dict:
    """Merge records into the JSON at ``path`` by key and write it back
    whole, with the ratios and the table recomputed (serve_matrix's file
    handling, this suite's ratios and table)."""
    return sm.merge(path, new_runs, invocation, sm.gpu_name(),
                    ratios_of=compute_ratios, table_of=table)


# --------------------------------------------------------------------- CLI

def add_common(parser: argparse.ArgumentParser, max_seconds=None) -> None:
    """Arguments of every subcommand, added to each one (``parents`` would
    share one --max-seconds action, and its default, among them)."""
    c = parser.add_argument
    c("--backends", default="stock,sparsemm",
      help="comma list: stock, sparsemm")
    c("--budget", type=int, default=128, help="sparsemm budget B")
    c("--sparsemm-config", default="{}", help="extra sparsemm settings (JSON)")
    c("--model", default="llava-1.5-7b",
      help=f"{list(sm.MODELS)} (written locally) or a model folder")
    c("--max-model-len", type=int, default=4096)
    c("--server-args", default="", help="extra vllm serve arguments")
    c("--base-url", default=None, help="test this running server (served as "
      "'model') instead of starting one; one backend names it")
    c("--max-seconds", type=float, default=max_seconds,
      help="cap on each load; a cut load fails its check")
    c("--health-timeout", type=float, default=420.0)
    c("--idle-timeout", type=float, default=120.0,
      help="wait for running and waiting requests to reach 0")
    c("--kv-tolerance", type=float, default=0.0,
      help="allowed KV-usage difference at rest")
    c("--image-size", default="336x336", help="WxH")
    c("--seed", type=int, default=0)
    c("--out", default="reliability.json", help="JSON to merge results into")
    c("--log-dir", default=None, help="default: <out>.logs")
    c("--work-dir", default=None, help="model folders and scratch files "
      "(default: <log-dir>/work)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    load = sub.add_parser("load", formatter_class=fmt,
                          help="mixed load; tokens, errors, pool, probe")
    add_common(load, max_seconds=150.0)
    a = load.add_argument
    a("--num-requests", type=int, default=2000)
    a("--concurrency", type=int, default=256)
    a("--num-images", type=int, default=32, help="shared image pool")
    a("--unique-share", type=float, default=0.25,
      help="image requests with an image of their own")
    a("--stream-share", type=float, default=0.5)
    a("--text-only-share", type=float, default=0.1)
    a("--disconnect-share", type=float, default=0.2,
      help="streaming requests that disconnect mid-stream")
    a("--long-share", type=float, default=0.5,
      help="requests with a long question")
    a("--max-tokens-range", default="16,512", help="min,max of max_tokens")

    faults = sub.add_parser("faults", formatter_class=fmt,
                            help="aborts, preemption, SIGTERM and restart")
    add_common(faults, max_seconds=90.0)
    a = faults.add_argument
    a("--parts", default=",".join(FAULT_PARTS), help="comma list")
    a("--abort-requests", type=int, default=256)
    a("--abort-concurrency", type=int, default=128)
    a("--abort-max-chunks", type=int, default=16)
    a("--abort-delay", type=float, default=0.3,
      help="early drops wait up to this long after the headers")
    a("--later-requests", type=int, default=16)
    a("--preempt-requests", type=int, default=64)
    a("--preempt-max-tokens", type=int, default=512)
    a("--preempt-fit", type=int, default=16,
      help="full-length requests the KV pool holds")
    a("--kv-cache-memory-bytes", type=int, default=None,
      help="default: computed from the model shape and --preempt-fit")
    a("--preempt-sparsemm-config", default='{"admission_reserve": 0}',
      help="sparsemm settings of the faults server: vLLM's optimistic "
      "admission, so it preempts as stock does")
    a("--restart-requests", type=int, default=256)
    a("--restart-concurrency", type=int, default=128)
    a("--restart-after", type=float, default=5.0,
      help="seconds of load before SIGTERM")
    a("--shutdown-timeout", type=float, default=60.0)
    a("--client-patience", type=float, default=20.0,
      help="seconds after SIGTERM until the restart load's clients hang up "
           "(vLLM keeps serving a stream it holds open)")

    bad = sub.add_parser("bad-input", formatter_class=fmt,
                         help="bad requests and bad start-up settings")
    add_common(bad, max_seconds=60.0)
    a = bad.add_argument
    a("--window", type=int, default=None, help="W (default: sparsemm's)")
    a("--huge-image-size", default="8000x8000")
    a("--startup-timeout", type=float, default=180.0)
    a("--skip-startup-errors", action="store_true")

    add_common(sub.add_parser("table", help="print the table of --out"))
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.log_dir = Path(args.log_dir or Path(args.out).with_suffix(".logs"))
    args.work_dir = Path(args.work_dir or args.log_dir / "work")
    names = [b for b in args.backends.split(",") if b]
    if not names or set(names) - {"stock", "sparsemm"}:
        raise SystemExit(f"--backends: choose from stock, sparsemm; got "
                         f"{args.backends!r}")
    if args.base_url and len(names) != 1:
        raise SystemExit("--base-url tests one server: give one --backends")
    return args


def context(args) -> Context:
    if args.base_url:
        return Context(Path(args.model).name, None)
    name, folder = sm.model_folder(args.model, args.work_dir)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return Context(name, folder, config)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.command == "table":
        print(merge_runs(out, {})["table"] if out.exists() else "no results")
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    invocation = sys.argv if argv is None else [sys.argv[0], *argv]
    with sm.sigterm_unwinds():
        passed = run_checks(args, out, invocation)
    data = merge_runs(out, {}, invocation)
    print(data["table"])
    print(f"\n{'ALL PASSED' if passed else 'SOME CHECKS FAILED'}; results: "
          f"{out}; logs: {args.log_dir}")
    return 0 if passed else 1


def run_checks(args, out: Path, invocation: list[str]) -> bool:
    """The command's checks on each backend (and sparsemm's start-up errors
    for ``bad-input``), each record merged into ``out``; whether all passed."""
    ctx, passed = context(args), True
    runner = RUNNERS[args.command]
    for backend in sm.backends(args, [args.budget]):
        record = run_record(args, ctx, backend.label, lambda v, r, b=backend:
                            runner(args, ctx, b, v, r))
        passed &= record["passed"]
        merge_runs(out, {record["key"]: record}, invocation)
    if (args.command == "bad-input" and "sparsemm" in args.backends
            and not args.base_url and not args.skip_startup_errors):
        record = run_record(args, ctx, "sparsemm-startup", lambda v, r:
                            run_startup_errors(args, ctx, v, r))
        passed &= record["passed"]
        merge_runs(out, {record["key"]: record}, invocation)
    return passed


if __name__ == "__main__":
    sys.exit(main())
