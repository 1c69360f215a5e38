"""Compression metrics on ``/metrics``: every process writes its own file,
the serving process merges them at each scrape (vLLM's API server sees no
engine-side state of a plugin otherwise)."""

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from vllm.v1.metrics import reader

from cpu_engine import BS, Engine
from vllm_sparsemm.engine import metrics


def _values(directory):
    """name -> summed sample value, as a scrape of the merged files sees it."""
    registry = CollectorRegistry()
    registry.register(metrics.MergedFiles(str(directory)))
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out, generate_latest(registry).decode()


def test_files_of_several_processes_merge_into_one_scrape(tmp_path):
    engine = metrics.MetricsWriter(str(tmp_path), "m", name="engine")
    worker = metrics.MetricsWriter(str(tmp_path), "m", name="worker")
    engine.requests_compressed.inc(2)
    engine.blocks_held.set(7)
    worker.requests_compressed.inc(3)
    worker.compaction_seconds.observe(0.004)
    worker.compaction_seconds.observe(0.3)
    engine.dump(force=True)
    worker.dump(force=True)
    values, text = _values(tmp_path)
    assert values["vllm:sparsemm_requests_compressed_total"] == 5
    assert values["vllm:sparsemm_blocks_held"] == 7
    assert values["vllm:sparsemm_compaction_seconds_count"] == 2
    assert 'model_name="m"' in text
    # a dump within a second of the last one writes nothing new
    engine.requests_compressed.inc()
    engine.dump()
    assert _values(tmp_path)[0]["vllm:sparsemm_requests_compressed_total"] == 5


@pytest.fixture
def engine_metrics(tmp_path, monkeypatch):
    """This process as an engine process: a writer, no collector of its own."""
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    monkeypatch.setattr(metrics, "_writer", None)
    writer = metrics.setup("tiny")
    yield tmp_path, writer
    monkeypatch.setattr(metrics, "_writer", None)


def test_the_engine_counts_compactions_and_blocks(engine_metrics):
    directory, writer = engine_metrics
    eng = Engine()
    prompts = {"a": 100, "b": 71, "c": 30}  # c is within the budget
    plans = eng.add_all(prompts, 64, 8, tail=[1])  # a spare step for "a"
    plans["a"].pop()
    compaction_steps = 0
    for schedule, tokens, outputs in eng.run(plans):
        compaction_steps += bool(eng.last_plan and
                                 eng.last_plan.selection_groups)
    eng.kv.new_step_starts()  # the next schedule(): times read back
    eng.step({"a": 1})
    eng.manager._report(force=True)  # what a second's dump would write
    values, _ = _values(directory)
    law = eng.law
    assert values["vllm:sparsemm_requests_compressed_total"] == 2
    assert values["vllm:sparsemm_prompt_tokens_full_total"] == 171
    kept = sum(float(law.kept(p).double().mean()) for p in (100, 71))
    assert values["vllm:sparsemm_prompt_tokens_kept_total"] == pytest.approx(
        kept)
    freed = sum(law.prompt_entries(p) - law.compacted_blocks(p, 0)
                for p in (100, 71))
    assert values["vllm:sparsemm_blocks_freed_total"] == freed
    assert values["vllm:sparsemm_blocks_held"] == sum(
        eng.held_blocks(r) for r in ("a", "b"))  # c is not compressed
    assert values["vllm:sparsemm_blocks_full_cache"] > values[
        "vllm:sparsemm_blocks_held"]
    assert values["vllm:sparsemm_prompt_blocks_parked"] == 0  # caching off
    # every step that compacted was timed (read back a step later)
    assert values["vllm:sparsemm_compaction_seconds_count"] == compaction_steps
    for rid in prompts:
        eng.finish(rid)
    values, _ = _values(directory)
    assert values["vllm:sparsemm_blocks_held"] == 0  # idle: shown at once


def test_the_serving_process_exposes_them_to_vllms_reader(tmp_path,
                                                          monkeypatch):
    """The process that configures the engine first makes the directory and
    registers the merged files where ``/metrics`` and ``LLM.get_metrics``
    read: vLLM's own registry."""
    from prometheus_client import REGISTRY
    monkeypatch.delenv(metrics.ENV, raising=False)
    monkeypatch.setattr(metrics, "_writer", None)
    registered = []
    monkeypatch.setattr(REGISTRY, "register", registered.append)
    writer = metrics.setup("served")
    assert len(registered) == 1
    directory = metrics.os.environ[metrics.ENV]
    writer.requests_compressed.inc(4)
    writer.dump(force=True)
    monkeypatch.setattr(REGISTRY, "collect", registered[0].collect)
    snapshot = {m.name: m for m in reader.get_metrics_snapshot()}
    assert snapshot["vllm:sparsemm_requests_compressed"].value == 4
    assert snapshot["vllm:sparsemm_requests_compressed"].labels == {
        "model_name": "served"}
    assert directory.startswith(metrics.tempfile.gettempdir())
    monkeypatch.setattr(metrics, "_writer", None)


def test_several_api_servers_serve_them_too(engine_metrics, monkeypatch):
    """With ``--api-server-count`` above 1 vLLM serves, per API server, a
    fresh registry of Prometheus' multiprocess files; the patched
    ``get_prometheus_registry`` adds sparsemm's merged files to it, and to
    nothing else (the default registry has them already)."""
    from prometheus_client import REGISTRY
    from vllm.v1.metrics import prometheus

    from vllm_sparsemm.engine import patches
    directory, writer = engine_metrics
    patches.patch_metrics_registry()
    writer.requests_compressed.inc(6)
    writer.dump(force=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory / "prom"))
    (directory / "prom").mkdir()
    text = generate_latest(prometheus.get_prometheus_registry()).decode()
    assert 'vllm:sparsemm_requests_compressed_total{model_name="tiny"} 6.0' \
        in text
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    before = dict(REGISTRY._collector_to_names)
    assert prometheus.get_prometheus_registry() is REGISTRY
    assert dict(REGISTRY._collector_to_names) == before
    # a bound name made before the patch is replaced (the instrumentator's)
    from vllm.entrypoints.serve.instrumentator import metrics as served
    assert served.get_prometheus_registry is prometheus.get_prometheus_registry


def test_values_already_in_multiprocess_files_are_not_written_twice(
        engine_metrics, monkeypatch):
    """A process whose prometheus_client keeps values in the multiprocess
    files (vLLM's registry reads them there) writes no file of its own."""
    from prometheus_client import values
    directory, writer = engine_metrics
    assert not metrics.values_in_multiprocess_files()
    monkeypatch.setattr(values, "ValueClass", object)
    assert metrics.values_in_multiprocess_files()
    writer.dump(force=True)
    assert not list(directory.glob("*.prom"))


def test_parked_prompt_blocks_are_shown(engine_metrics):
    """With prefix caching, a running request's released prompt blocks are
    parked (free, hits, handed out last): the gauge counts them until the
    request ends."""
    directory, writer = engine_metrics
    eng = Engine(caching=True)
    plans = eng.add_all({"a": 100}, 64, 3)
    for _ in eng.run(plans):
        pass
    eng.manager._report(force=True)
    values, _ = _values(directory)
    assert values["vllm:sparsemm_prompt_blocks_parked"] == 100 // BS
    eng.finish("a")
    values, _ = _values(directory)
    assert values["vllm:sparsemm_prompt_blocks_parked"] == 0
