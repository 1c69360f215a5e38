"""The repository speaks of the product: its layers import downwards only, the
README stays a user's document, results stay small, and measurements are
named by GPU and commit (never by the sessions that ran them)."""

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vllm_sparsemm"
LAYERS = ["core", "kernels", "engine", "tools", "testing"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_layers_import_downwards_only():
    """core -> kernels -> engine -> tools (testing beside tools); core uses
    no vLLM at all."""
    for layer in LAYERS:
        above = LAYERS[LAYERS.index(layer) + 1:]
        for path in (PACKAGE / layer).rglob("*.py"):
            imported = _imports(path)
            upward = sorted(name for name in imported for other in above
                            if name.startswith(f"vllm_sparsemm.{other}")
                            and not (layer == "tools" and other == "testing"))
            assert not upward, (path, upward)
            if layer == "core":
                assert not any(name == "vllm" or name.startswith("vllm.")
                               for name in imported), path


def test_readme_is_a_users_document():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "python3 -m pytest -q" in readme  # the test command CI runs
    assert "python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_results_are_small_json_only():
    results = list((ROOT / "benchmarks" / "results").iterdir())
    assert results and all(p.suffix == ".json" for p in results)
    assert sum(p.stat().st_size for p in results) <= 1_500_000


def test_measurements_are_named_by_gpu_and_commit():
    word = re.compile(r"\b" + "le" + r"ase\b", re.I)  # a session's name
    folders = ["vllm_sparsemm", "tests", "examples", "benchmarks", "docs"]
    files = [ROOT / "README.md"] + [
        p for folder in folders for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".md", ".sh") and p.is_file()]
    named = [str(p) for p in files if word.search(p.read_text())]
    assert not named


def test_gpu_runner_names_test_files_that_exist():
    """tests/gpu/run_all.sh keeps up with moved test files, and every GPU
    test file is in it."""
    script = (ROOT / "tests/gpu/run_all.sh").read_text()
    named = set(re.findall(r"tests/[\w/]+\.py", script))
    named |= {"tests/engine/test_engine_gpu.py"} if "$engine" in script else set()
    assert named and all((ROOT / path).is_file() for path in named), named
    gpu_files = {str(path.relative_to(ROOT)) for path in
                 (ROOT / "tests").rglob("test_*.py")
                 if re.search(r"^(pytestmark = |@)pytest\.mark\.gpu",
                              path.read_text(), re.M)}
    assert gpu_files <= named, gpu_files - named


def test_gpu_runner_selects_each_engine_test_once():
    """Each ``-k`` of tests/gpu/run_all.sh picks at least one GPU engine
    test, and every one of them is picked exactly once (a name that is a
    substring of another test's would run that one twice)."""
    import subprocess
    import sys
    script = (ROOT / "tests/gpu/run_all.sh").read_text()
    selections = re.findall(r'\$engine -k ([^"]+)"', script)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
         "-p", "no:cacheprovider", "tests/engine/test_engine_gpu.py"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    names = [line.split("::", 1)[1] for line in done.stdout.splitlines()
             if "::" in line]
    picked = []
    for selection in selections:
        chosen = [name for name in names if selection.lower() in name.lower()]
        assert chosen, selection
        picked += chosen
    assert sorted(picked) == sorted(names)


def test_gpu_runner_makes_its_log_folder(tmp_path):
    """``OUT`` may name a folder that does not exist yet: the runner makes
    it, so each test's log and summary line are there (on this CPU machine
    every GPU test skips, which the runner counts as a failure, rc 5)."""
    import subprocess

    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU the selection would run its engines")
    out = tmp_path / "new" / "logs"
    done = subprocess.run(
        ["bash", "tests/gpu/run_all.sh", "triton"], cwd=ROOT,
        env=dict(os.environ, OUT=str(out), LIMIT="120"),
        capture_output=True, text=True)
    assert (out / "gpu_triton.log").is_file(), done.stdout + done.stderr
    assert "== triton rc=5" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1
