"""`vllm serve` in a subprocess, for the serve GPU tests: started on a free
port and ready once ``/health`` answers, stopped at the end; JSON requests,
the ``vllm:sparsemm_*`` lines of ``/metrics`` and the settings it logs."""

import contextlib
import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scripts import load_script


@dataclasses.dataclass
class Server:
    port: int
    log_path: Path
    log: io.TextIOBase

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model, *args, log_path, start_timeout=420):
    """``vllm serve model *args`` until the block ends; the server's output
    goes to ``log_path``, whose tail a failed start shows."""
    port = free_port()
    log_path = Path(log_path)
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve",
         str(model), *args, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT)
    handle = Server(port, log_path, log)
    try:
        for _ in range(start_timeout // 2):  # a poll every 2 s
            if server.poll() is not None:
                text = handle.log_text()
                raise AssertionError(f"server exited: {root_cause(text)}; "
                                     f"its log ends:\n{text[-3000:]}")
            try:
                urllib.request.urlopen(f"{handle.url}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            raise AssertionError(f"server did not start in {start_timeout} s")
        yield handle
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


# a 7B server's pool: one max_model_len (4096) request of a 32-KV-head 7B
# (LLaVA-1.5, LLaVA-NeXT) with its prompt blocks and compacted ones at once
SEVEN_B_POOL = 3 << 30


def fixed_pool(nbytes: int) -> list[str]:
    """``vllm serve`` arguments for a KV pool of ``nbytes``, not sized from a
    memory profile, which other tests sharing the GPU would disturb
    (tests/gpu/run_all.sh ``JOBS``)."""
    return ["--gpu-memory-utilization", "0.05",
            "--kv-cache-memory-bytes", str(nbytes)]


def root_cause(log_text: str) -> str:
    """The first exception a server's log names (the engine core's, which
    the API server's own traceback pushes out of the log's tail)."""
    found = re.search(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR [^]]*\] )?"
                      r"(\w*(?:Error|Exception): .*)$", log_text, re.M)
    return found.group(1).strip() if found else "no error in its log"


def serve_log(tmp_path, tag: str = "") -> Path:
    """Where a serve test's server log goes: ``SPARSEMM_SERVE_LOG`` (else
    ``tmp_path/serve.log``) with ``tag`` added to its name."""
    path = Path(os.environ.get("SPARSEMM_SERVE_LOG", tmp_path / "serve.log"))
    return path.with_stem(path.stem + tag)


def post(url, body, timeout=120):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def image_data_url(seed, size=(400, 300)) -> str:
    """Random pixels as a base64 PNG data URL (the serve benchmark's)."""
    return load_script("chat_client").image_url(seed, size, "PNG")


def sparsemm_metrics(port) -> dict[str, float]:
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


def after_compressions(port, count, polls=30):
    """/metrics once the counters show ``count`` compressed requests."""
    return until_compressed(lambda: sparsemm_metrics(port), count,
                            "vllm:sparsemm_requests_compressed_total", polls)


def until_compressed(read, count, key, polls=30) -> dict[str, float]:
    """``read()`` (sparsemm's metrics by name) once ``key``, its compressed
    requests counter, reaches ``count`` (the engine writes them at most once
    a second, and when it goes idle), polled every half second."""
    for _ in range(polls):
        now = read()
        if now.get(key, 0) >= count:
            return now
        time.sleep(0.5)
    raise AssertionError(f"the compression counters did not reach {count}: "
                         f"{now}")


def settled_metrics(port) -> dict:
    """/metrics once the requests sent so far are counted in it (the engine
    writes its counts at most once a second)."""
    time.sleep(2.0)
    return after_compressions(port, 0)


def compression_since(before, after) -> dict[str, float]:
    """What the requests compressed between two /metrics reads kept (per
    KV head, averaged), freed (blocks) and had in full (prompt tokens)."""
    def grew(name):
        name = f"vllm:sparsemm_{name}_total"
        return after.get(name, 0.0) - before.get(name, 0.0)
    return {"kept": grew("prompt_tokens_kept"), "freed": grew("blocks_freed"),
            "full": grew("prompt_tokens_full"),
            "requests": grew("requests_compressed")}


def late_sparsemm_builds(log_text) -> set[str]:
    """sparsemm's Triton kernels that vLLM's JIT monitor saw built after its
    warm-up (each a latency spike; an error with --jit-monitor-mode error)."""
    from vllm_sparsemm.kernels import triton_ops
    ours = {name for name in vars(triton_ops) if name.endswith("_kernel")}
    return ours & set(re.findall(r"JIT compilation during inference: (\w+)",
                                 log_text))


def logged_settings(log_text) -> dict:
    """The effective settings the server logs once at start-up."""
    line = re.search(r"sparsemm: budget=(\d+) window=(\d+) ratio=(\S+) .*"
                     r"block_size=(\d+)", log_text)
    assert line, "no start-up settings line in the server log"
    return {"budget": int(line[1]), "window": int(line[2]),
            "ratio": float(line[3]), "block_size": int(line[4])}
