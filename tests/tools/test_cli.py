"""The ``vllm-sparsemm`` command: plan, scores, plot; one-line errors, exit 2."""

import json
import re
import types

import pytest
from PIL import Image

from vllm_sparsemm.core.block_law import BlockLaw
from vllm_sparsemm.tools.cli import build_parser, main
from vllm_sparsemm.engine.plan_setup import budget_plan

SHIPPED = "llava-v1.6-vicuna-7b"


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
    from vllm_sparsemm.testing.checkpoints import write_dummy_llava_next_7b
    return write_dummy_llava_next_7b(tmp_path_factory.mktemp("m") / "next")


def _served_law(folder, budget):
    """The law the backend builds for this model folder (plan_setup, as the
    engine's config patch does), from config objects vLLM would pass."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(folder))
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(
            hf_config=config, hf_text_config=config.get_text_config()),
        additional_config={"sparsemm": {"budget": budget}})
    return BlockLaw(budget_plan(vllm_config)[0], 16)


@pytest.mark.parametrize("budget, prompt", [(64, 2880), (256, 2880),
                                            (256, 1200), (4096, 2880)])
def test_plan_gives_the_backends_numbers(capsys, next_folder, budget,
                                         prompt):
    code, out, err = _run(capsys, "plan", str(next_folder), "--budget",
                          str(budget), "--prompt-len", str(prompt), "--json")
    assert code == 0, err
    report = json.loads(out)
    law = _served_law(next_folder, budget)
    compressed = law.compresses(prompt)
    assert report["compressed"] is compressed
    assert report["full_blocks"] == -(-prompt // 16)
    assert report["compressed_blocks"] == (
        law.compacted_blocks(prompt, 0) if compressed else -(-prompt // 16))
    assert report["ratio"] == report["full_blocks"] / report[
        "compressed_blocks"]
    assert report["kept"] == law.kept(prompt).tolist()
    assert report["scores"].endswith(f"{SHIPPED}.json")  # found by shape


def test_the_long_prompt_folder_plans_a_128k_prompt(capsys, tmp_path):
    """The GPU test's dummy Qwen2-7B text folder (test_long_prompt_gpu.py)
    takes a 128K-token prompt, kept at its budget under uniform scores."""
    from vllm_sparsemm.testing.checkpoints import write_dummy_qwen2_7b_text
    prompt = 128 * 1024 - 16
    folder = write_dummy_qwen2_7b_text(tmp_path / "qwen2-7b", prompt + 80)
    code, out, err = _run(capsys, "plan", str(folder), "--budget", "1024",
                          "--prompt-len", str(prompt), "--head-scores",
                          "uniform", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["compressed"] and report["full_blocks"] == prompt // 16
    assert {k for row in report["kept"] for k in row} == {1024}
    assert len(report["kept"]) == 28 and len(report["kept"][0]) == 4


def test_plan_of_a_shipped_name_prints_the_table_and_a_picture(capsys,
                                                               tmp_path):
    picture = tmp_path / "plan.png"
    code, out, err = _run(capsys, "plan", SHIPPED, "--prompt-len", "2880",
                          "--plot", str(picture))
    assert code == 0, err
    assert "180 in the full cache, 16 compressed (11.25x fewer)" in out
    assert len(re.findall(r"^ +\d+: ", out, re.M)) == 32  # a row per layer
    assert Image.open(picture).format == "PNG"


def test_scores_lists_the_shipped_files(capsys):
    code, out, _ = _run(capsys, "scores", "--json")
    assert code == 0
    (entry,) = [f for f in json.loads(out) if f["name"] == SHIPPED]
    assert (entry["layers"], entry["query_heads"], entry["kv_heads"]) == (
        32, 32, 32)
    assert entry["architectures"] == ["LlavaNextForConditionalGeneration"]
    code, out, _ = _run(capsys, "scores")
    assert out.startswith(f"{SHIPPED}: 32 layers x 32 query heads")


def test_plot_accepts_a_shipped_name(capsys, tmp_path):
    code, out, err = _run(capsys, "plot", SHIPPED, "--out",
                          str(tmp_path / "s.png"))
    assert code == 0, err
    assert Image.open(tmp_path / "s.png").format == "PNG"


@pytest.mark.parametrize("argv, words", [
    (["plan", "no-such-scores", "--prompt-len", "10"], "not found"),
    (["plan", SHIPPED], "--prompt-len"),
    (["plan", SHIPPED, "--prompt-len", "10", "--budget", "16"],
     "larger than the window"),
    (["plan", SHIPPED, "--prompt-len", "0"], "--prompt-len must be positive"),
    (["plot", "no-such-scores", "--out", "x.png"], "not found"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_and_exit_2(capsys, argv, words):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and words in err
    assert err.startswith("vllm-sparsemm")


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("vllm-sparsemm ")
    plan = build_parser()._subparsers._group_actions[0].choices["plan"]
    assert "(default: 256)" in plan.format_help()
