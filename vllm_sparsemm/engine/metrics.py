"""Prometheus metrics of compression, on the server's ``/metrics``.

Compaction is counted where it happens: the scheduler (EngineCore) counts
compressed requests and the blocks they give back, the workers time the
compaction. vLLM's ``/metrics`` is served by the API server process, which
sees none of that, and vLLM 0.26.0 carries no plugin data from the engine.
So each process writes its metrics, in Prometheus' text format, to a file of
one directory (``VLLM_SPARSEMM_METRICS_DIR``, made by the process that
configures the engine first and inherited by the engine's processes), and a
collector registered there merges them at every scrape: counters and
histograms summed over processes, as Prometheus' multiprocess mode does.

Names follow vLLM's (``vllm:sparsemm_...``, label ``model_name``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.parser import text_string_to_metric_families

ENV = "VLLM_SPARSEMM_METRICS_DIR"
DUMP_EVERY_S = 1.0  # a scrape sees the engine at most this much behind

_writer: "MetricsWriter | None" = None


class MetricsWriter:
    """This process's sparsemm metrics, written to ``<dir>/<pid>.prom``."""

    def __init__(self, directory: str, model_name: str,
                 name: str | None = None):
        self.path = Path(directory) / f"{name or os.getpid()}.prom"
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def labelled(metric):
            return metric.labels(model_name=model_name)

        self.requests_compressed = labelled(Counter(
            "vllm:sparsemm_requests_compressed",
            "Requests whose prompt was compressed", labels, registry=r))
        self.blocks_freed = labelled(Counter(
            "vllm:sparsemm_blocks_freed",
            "KV blocks compaction gave back (prompt blocks less compacted "
            "ones)", labels, registry=r))
        self.prompt_tokens_kept = labelled(Counter(
            "vllm:sparsemm_prompt_tokens_kept",
            "Prompt tokens compressed requests kept, averaged over KV heads",
            labels, registry=r))
        self.prompt_tokens_full = labelled(Counter(
            "vllm:sparsemm_prompt_tokens_full",
            "Prompt tokens of the same requests in the full cache", labels,
            registry=r))
        # summed over processes (Prometheus' multiprocess mode included)
        self.blocks_held = labelled(Gauge(
            "vllm:sparsemm_blocks_held",
            "KV blocks held by compressed requests now", labels, registry=r,
            multiprocess_mode="sum"))
        self.blocks_full = labelled(Gauge(
            "vllm:sparsemm_blocks_full_cache",
            "KV blocks the same requests would hold uncompressed", labels,
            registry=r, multiprocess_mode="sum"))
        self.prompt_blocks_parked = labelled(Gauge(
            "vllm:sparsemm_prompt_blocks_parked",
            "Free KV blocks that hold running compressed requests' released "
            "prompts or waiting requests' cache hits: handed out last",
            labels, registry=r,
            multiprocess_mode="sum"))
        self.admission_waits = Counter(
            "vllm:sparsemm_admission_waits",
            "Scheduler steps in which sparsemm's admission held a waiting "
            "request back (reason: gate, the pool could run short; pacer, "
            "compressed requests start no faster than the pool sustains)",
            labels + ["reason"], registry=r)
        self.model_name = model_name
        self.compaction_seconds = labelled(Histogram(
            "vllm:sparsemm_compaction_seconds",
            "GPU time of a step's selection and compaction", labels,
            registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
                                 0.05, 0.1, 0.2, 0.5, 1.0)))
        self._dumped = -DUMP_EVERY_S

    def due(self) -> bool:
        """Whether a ``dump`` now would write (at most one a second)."""
        return time.monotonic() - self._dumped >= DUMP_EVERY_S

    def dump(self, force: bool = False) -> None:
        """Write the metrics (atomically) unless done in the last second, or
        unless Prometheus' multiprocess files already hold them."""
        if (not force and not self.due()) or values_in_multiprocess_files():
            return
        self._dumped = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_bytes(generate_latest(self.registry))
            os.replace(tmp, self.path)
        except OSError:
            pass  # the directory went away with its server: nothing to serve


class MergedFiles:
    """A Prometheus collector: every process's file, merged."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def collect(self):
        families: dict[str, object] = {}
        samples: dict[tuple, float] = {}
        for path in sorted(self.directory.glob("*.prom")):
            try:
                text = path.read_text()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, family)
                for s in family.samples:
                    key = (family.name, s.name,
                           tuple(sorted(s.labels.items())))
                    samples[key] = samples.get(key, 0.0) + s.value
        for name, family in families.items():
            merged = type(family)(family.name, family.documentation,
                                  family.type, family.unit)
            for (owner, sample, labels), value in samples.items():
                if owner == name:
                    merged.add_sample(sample, dict(labels), value)
            yield merged


def values_in_multiprocess_files() -> bool:
    """Whether this process's metric values live in Prometheus' multiprocess
    files (``PROMETHEUS_MULTIPROC_DIR`` set when it imported prometheus_client,
    as for processes vLLM starts with ``--api-server-count`` above 1); the
    registry vLLM then serves reads them there."""
    from prometheus_client import values
    return values.ValueClass is not values.MutexValue


def serve_in(registry) -> None:
    """Add the merged files to a registry vLLM serves. The default registry
    already has them (``setup``); with several API servers vLLM serves a
    fresh multiprocess registry per server, which has not."""
    from prometheus_client import REGISTRY
    directory = os.environ.get(ENV)
    if directory is not None and registry is not REGISTRY:
        registry.register(MergedFiles(directory))


def model_label(vllm_config) -> str:
    """The name vLLM's own metrics label the model by."""
    name = vllm_config.model_config.served_model_name
    return name[0] if isinstance(name, (list, tuple)) else str(name)


def setup(model_name: str) -> MetricsWriter:
    """This process's writer; the first process to configure a sparsemm
    engine also makes the directory and serves it (its registry is the one
    vLLM's ``/metrics`` and ``LLM.get_metrics`` read)."""
    global _writer
    if _writer is None:
        directory = os.environ.get(ENV)
        if directory is None:
            directory = tempfile.mkdtemp(prefix="vllm-sparsemm-metrics-")
            os.environ[ENV] = directory  # the engine's processes inherit it
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            from prometheus_client import REGISTRY
            REGISTRY.register(MergedFiles(directory))
        _writer = MetricsWriter(directory, model_name)
    return _writer


def writer() -> MetricsWriter | None:
    """This process's writer, once a sparsemm engine is configured here."""
    return _writer
