"""vLLM's ``/metrics`` as the serve benchmarks read it: the Prometheus text
parsed, counters summed over label sets, histogram quantiles, what a server
counted over one load, and a poller for the gauges (running requests, KV
usage) no before/after difference can see."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

FINISHED_OK = ("stop", "length")  # finish reasons of a completed request

LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text format to {sample name: [(labels, value), ...]}."""
    metrics: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels_text, value_text = rest.rsplit("}", 1)
            labels = dict(LABEL.findall(labels_text))
        else:
            name, value_text = line.split(None, 1)
            labels = {}
        try:
            value = float(value_text.split()[0])
        except (ValueError, IndexError):
            continue
        metrics.setdefault(name.strip(), []).append((labels, value))
    return metrics


def total(metrics: dict, name: str, **match) -> float | None:
    """Sum of ``name`` over label sets that match (engines, models)."""
    if name not in metrics:
        return None
    return sum(v for labels, v in metrics[name]
               if all(labels.get(k) == x for k, x in match.items()))


def buckets(metrics: dict, name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative (upper bound, count) pairs, summed over
    label sets, by bound."""
    counts: dict[float, float] = {}
    for labels, v in metrics.get(name + "_bucket", []):
        le = float(labels["le"])  # float() reads "+Inf"
        counts[le] = counts.get(le, 0.0) + v
    return sorted(counts.items())


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]):
    """Prometheus's estimate: linear within the bucket the rank falls in."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside
                                              if inside else 1.0)
        lower, below = bound, count
    return lower


def server_delta(before: dict, after: dict) -> dict:
    """What the server counted over one load: counter differences."""
    def diff(name, **match):
        a, b = total(after, name, **match), total(before, name, **match)
        return None if a is None else a - (b or 0.0)

    hits = diff("vllm:prefix_cache_hits_total")
    queries = diff("vllm:prefix_cache_queries_total")
    finished = {r: diff("vllm:request_success_total", finished_reason=r)
                for r in ("stop", "length", "abort", "error", "repetition")}
    out = {
        "prefix_cache_hits": hits, "prefix_cache_queries": queries,
        "prefix_cache_hit_rate": hits / queries if hits is not None
        and queries else None,
        "mm_cache_hits": diff("vllm:mm_cache_hits_total"),
        "mm_cache_queries": diff("vllm:mm_cache_queries_total"),
        "prompt_tokens": diff("vllm:prompt_tokens_total"),
        "generation_tokens": diff("vllm:generation_tokens_total"),
        # finished requests' prompt and output tokens, and what sparsemm's
        # compaction kept of the prompts it compressed (mean over KV heads)
        "finished_prompt_tokens": diff("vllm:request_prompt_tokens_sum"),
        "finished_output_tokens": diff("vllm:request_generation_tokens_sum"),
        "finished_requests": diff("vllm:request_prompt_tokens_count"),
        "compressed_prompt_tokens": diff(
            "vllm:sparsemm_prompt_tokens_full_total"),
        "compressed_prompt_tokens_kept": diff(
            "vllm:sparsemm_prompt_tokens_kept_total"),
        "preemptions": diff("vllm:num_preemptions_total"),
        # sparsemm's own: steps its admission held a request back, and
        # the GPU seconds of selection and compaction
        "admission_waits": {r: diff("vllm:sparsemm_admission_waits_total",
                                    reason=r) for r in ("gate", "pacer")},
        "compaction_seconds": diff("vllm:sparsemm_compaction_seconds_sum"),
        "compactions": diff("vllm:sparsemm_compaction_seconds_count"),
        "requests_finished": finished,
        "completed": sum(finished[r] or 0 for r in FINISHED_OK),
    }
    for key, name in (("ttft", "vllm:time_to_first_token_seconds"),
                      ("tpot", "vllm:request_time_per_output_token_seconds"),
                      ("e2el", "vllm:e2e_request_latency_seconds"),
                      # the engine's share of TTFT: waiting to be scheduled,
                      # then scheduled until the first token (the rest is the
                      # API server's: parsing, media, streaming)
                      ("queue", "vllm:request_queue_time_seconds"),
                      ("prefill", "vllm:request_prefill_time_seconds")):
        count, seconds = diff(name + "_count"), diff(name + "_sum")
        out[f"mean_{key}_ms"] = (1000 * seconds / count if count and
                                 seconds is not None else None)
        prior = dict(buckets(before, name))
        cumulative = [(le, n - prior.get(le, 0.0))
                      for le, n in buckets(after, name)]
        p99 = histogram_quantile(0.99, cumulative)
        out[f"p99_{key}_ms"] = None if p99 is None else 1000 * p99
    return out


def active_rate(timeline: list[list[float]], column: int = 3) -> float | None:
    """Tokens per second while the counter in ``column`` moved: from the last
    sample before it first rose to the sample where it last rose, so client
    start-up and teardown do not count."""
    if len(timeline) < 2:
        return None
    values = [row[column] for row in timeline]
    rises = [i for i in range(1, len(values)) if values[i] > values[i - 1]]
    if not rises:
        return None
    first, last = rises[0] - 1, rises[-1]
    seconds = timeline[last][0] - timeline[first][0]
    return (values[last] - values[first]) / seconds if seconds > 0 else None


def kv_tokens_per_request(server: dict) -> float | None:
    """The KV tokens a finished request held at its end, on average over a
    load: its prompt and output, less the prompt tokens sparsemm's
    compaction dropped (for EVS the prompt is already the pruned one).

    Compaction counts every request compressed in the window, finished or
    not; a load cut by ``--max-seconds`` finishes only some of them, so the
    dropped share is taken over all prompt tokens the server took in and
    applied to the finished requests' prompts."""
    count, prompt = (server.get("finished_requests"),
                     server.get("finished_prompt_tokens"))
    if not count or prompt is None:
        return None
    dropped = ((server.get("compressed_prompt_tokens") or 0)
               - (server.get("compressed_prompt_tokens_kept") or 0))
    taken_in = server.get("prompt_tokens")
    if taken_in:
        dropped = prompt * min(dropped / taken_in, 1.0)
    output = server.get("finished_output_tokens") or 0
    return (prompt + output - dropped) / count


def pool_blocks_per_request(timeline: list[list[float]],
                            num_blocks: int | None) -> float | None:
    """KV blocks in use per running request, from the pool's usage (any
    backend), averaged over the samples with requests running."""
    rows = [row for row in timeline if row[1] > 0]
    if not rows or not num_blocks:
        return None
    return sum(row[4] * num_blocks / row[1] for row in rows) / len(rows)


def cache_numbers(metrics: dict) -> tuple[int | None, int | None]:
    """(block size, blocks in the pool) from ``vllm:cache_config_info``."""
    labels = (metrics.get("vllm:cache_config_info") or [({}, 0.0)])[0][0]

    def number(key):
        value = labels.get(key)
        return int(value) if value and value.isdigit() else None
    return number("block_size"), number("num_gpu_blocks")


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def scrape(base_url: str) -> dict:
    try:
        return parse_prometheus(http_get(base_url + "/metrics"))
    except OSError:
        return {}


class MetricsPoller(threading.Thread):
    """Scrapes ``/metrics`` during a load: the peak of running requests is a
    gauge no before/after difference can see. Rows are [seconds, running,
    waiting, generation tokens so far, KV-cache usage]. ``busy`` is set at
    the first sample with a request in the server: when the load began."""

    def __init__(self, url: str, interval: float = 0.5):
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.timeline: list[list[float]] = []
        self.busy = threading.Event()
        self._halt = threading.Event()

    def run(self):
        origin = time.monotonic()
        while not self._halt.is_set():
            try:
                m = parse_prometheus(http_get(self.url))
                self.timeline.append([
                    round(time.monotonic() - origin, 3),
                    total(m, "vllm:num_requests_running") or 0.0,
                    total(m, "vllm:num_requests_waiting") or 0.0,
                    total(m, "vllm:generation_tokens_total") or 0.0,
                    total(m, "vllm:kv_cache_usage_perc") or 0.0])
                if self.timeline[-1][1] or self.timeline[-1][2]:
                    self.busy.set()
            except OSError:
                pass
            self._halt.wait(self.interval)

    def stop(self) -> list[list[float]]:
        self._halt.set()
        self.join()
        return self.timeline


def peak(timeline, column: int) -> float | None:
    return max((row[column] for row in timeline), default=None)
