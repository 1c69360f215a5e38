"""Score files: the shipped Vicuna file and every rejection path."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from vllm_sparsemm.core.scores import (HeadScoreError, check_scores_fit,
                                       load_head_scores, parse_head_scores,
                                       resolve_score_file, shipped_score_files)

REPO = Path(__file__).resolve().parents[2]
VICUNA = REPO / "head_scores" / "llava-v1.6-vicuna-7b.json"


def test_shipped_vicuna_file_is_the_authors_bytes():
    digest = hashlib.sha256(VICUNA.read_bytes()).hexdigest()
    assert digest == ("179b79689efbec82a18757fd725005b0d94f63c80dd4ffdfc4e3"
                      "79c8c4fa8901")


def test_vicuna_scores_are_per_head_means():
    scores = load_head_scores(VICUNA)
    raw = json.loads(VICUNA.read_text())
    assert scores.shape == (32, 32)
    assert scores[0, 7].item() == pytest.approx(sum(raw["0-7"]) / 2, rel=1e-15)
    assert scores[31, 31].item() == pytest.approx(sum(raw["31-31"]) / 2,
                                                  rel=1e-15)
    assert int((scores == 0).sum()) == 10  # dossier: 10 heads score exactly 0
    share = scores / scores.sum()
    assert share[14].sum().item() == pytest.approx(0.110, abs=0.001)


def test_layer_and_head_come_from_the_key_not_the_order():
    scores = parse_head_scores({"1-0": [4.0], "0-1": [2.0], "0-0": [1.0, 3.0],
                                "1-1": [0.0]})
    assert scores.tolist() == [[2.0, 2.0], [4.0, 0.0]]


def test_resolve_by_shipped_name_and_by_path(tmp_path):
    assert "llava-v1.6-vicuna-7b" in shipped_score_files()
    assert resolve_score_file("llava-v1.6-vicuna-7b").read_bytes() == (
        VICUNA.read_bytes())
    assert resolve_score_file(str(VICUNA)) == VICUNA
    with pytest.raises(HeadScoreError, match="not found.*shipped names"):
        resolve_score_file("no-such-model")


@pytest.mark.parametrize("data, message", [
    ([1, 2], "non-empty JSON object"),
    ({}, "non-empty JSON object"),
    ({"0-0": [1.0], "0_1": [1.0]}, "malformed key '0_1'"),
    ({"0-0": [1.0], "a-1": [1.0]}, "malformed key 'a-1'"),
    ({"0-0": [1.0], "00-1": [1.0]}, "malformed key '00-1'"),
    ({"0-0": 1.0}, "non-empty list of numbers"),
    ({"0-0": []}, "non-empty list of numbers"),
    ({"0-0": ["1"]}, "non-empty list of numbers"),
    ({"0-0": [True]}, "non-empty list of numbers"),
    ({"0-0": [float("nan")]}, "non-finite"),
    ({"0-0": [float("inf")]}, "non-finite"),
    ({"0-0": [1.0, -0.5]}, "negative"),
    ({"0-0": [0.0], "0-1": [0.0]}, "all-zero"),
    ({"0-0": [1.0], "0-1": [1.0], "1-0": [1.0]}, "full 2 x 2.*'1-1'"),
])
def test_bad_score_data_is_rejected(data, message):
    with pytest.raises(HeadScoreError, match=message):
        parse_head_scores(data)


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(HeadScoreError, match="cannot read"):
        load_head_scores(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{'0-0': [1]}")
    with pytest.raises(HeadScoreError, match="not valid JSON"):
        load_head_scores(broken)
    nan = tmp_path / "nan.json"
    nan.write_text('{"0-0": [NaN]}')
    with pytest.raises(HeadScoreError, match="non-finite"):
        load_head_scores(nan)


HUGE = "9" * 400  # a valid JSON integer, far past float's range


@pytest.mark.parametrize("text, message", [
    ('{"0-0": [1.0], "0-1": [%s]}' % HUGE,
     r"'0-1' holds a number too large for a float"),
    ('{"0-0": [%s.5]}' % HUGE, r"'0-0' holds a non-finite value"),
    ('{"0-0": [1e308, 1e308]}', r"sum past the float range"),
    ('{"0-0": [1e308], "0-1": [1e308]}', r"sum past the float range"),
    ('{"0-0": [1%s]}' % ("0" * 5000), r"number too long to read"),
    ('[' * 100000 + ']' * 100000, r"nested too deep"),
    ('{"0-0": [1.0], "0-%s": [1.0]}' % HUGE, r"1 x 1%s .*'0-1'" % ("0" * 400)),
])
def test_oversized_numbers_are_rejected_naming_file_and_key(tmp_path, text,
                                                            message):
    """JSON numbers have no size limit; a score file's must fit a float."""
    path = tmp_path / "big.json"
    path.write_text(text)
    with pytest.raises(HeadScoreError, match=message) as err:
        load_head_scores(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_shape_must_match_the_model():
    scores = torch.ones(32, 32)
    check_scores_fit(scores, 32, 32)
    with pytest.raises(HeadScoreError,
                       match="32 layers x 32 query heads, but the model has "
                       "28 layers x 28"):
        check_scores_fit(scores, 28, 28)
