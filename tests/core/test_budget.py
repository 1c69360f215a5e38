"""The budget formula, checked by hand and on the authors' Vicuna scores."""

from pathlib import Path

import pytest
import torch

from vllm_sparsemm.core.budget import compresses, head_budgets, kept_counts
from vllm_sparsemm.core.scores import load_head_scores

VICUNA = Path(__file__).resolve().parents[2] / "head_scores" / (
    "llava-v1.6-vicuna-7b.json")


def test_hand_computed_caps_round_half_to_even():
    # s = [[1, 3], [0, 4]] / 8; b = 42 - 32 = 10; m = 1; pooled = 9 * 2 * 2 = 36
    # caps = round([[5.5, 14.5], [1, 19]]) -> [[6, 14], [1, 19]] (half to even)
    scores = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    caps = head_budgets(scores, num_kv_heads=2, budget=42, window=32, ratio=0.1)
    assert caps.dtype == torch.int64
    assert caps.tolist() == [[6, 14], [1, 19]]


def test_gqa_sums_the_query_heads_of_each_kv_head():
    # kv shares [0.25, 0.75]; b = 10, m = 1, pooled = 9 * 1 * 2 = 18
    # caps = round([5.5, 14.5]) = [6, 14]
    scores = torch.tensor([[1.0, 1.0, 2.0, 4.0]])
    caps = head_budgets(scores, num_kv_heads=2, budget=42, window=32)
    assert caps.tolist() == [[6, 14]]


def test_uniform_minimum_is_floored():
    # b = 10, ratio 0.25 -> m = floor(2.5) = 2; pooled = 8 * 1 * 2 = 16
    scores = torch.tensor([[1.0, 0.0]])
    caps = head_budgets(scores, num_kv_heads=2, budget=42, window=32,
                        ratio=0.25)
    assert caps.tolist() == [[18, 2]]


@pytest.mark.parametrize("budget, total, low, high", [
    (64, 32752, 3, 766),
    (256, 229369, 22, 5337),
    (1024, 1015805, 99, 23595),
])
def test_vicuna_caps(budget, total, low, high):
    caps = head_budgets(load_head_scores(VICUNA), 32, budget)
    assert caps.shape == (32, 32)
    assert int(caps.sum()) == total  # ~ (B - W) * L * Hkv, up to rounding
    # each cap is rounded by at most 1/2, so the total is within 1024 / 2
    assert abs(int(caps.sum()) - (budget - 32) * 1024) <= 512
    assert (int(caps.min()), int(caps.max())) == (low, high)


def test_vicuna_layer_14_gets_its_share():
    caps = head_budgets(load_head_scores(VICUNA), 32, 256)
    assert int(caps[14].sum()) == 23467  # dossier: 23,467 of 229,376 slots
    assert int(caps[1].sum()) == 802


def test_kept_counts_truncate_and_add_the_window():
    caps = torch.tensor([[0, 5, 100]])
    assert kept_counts(caps, prompt_len=50, budget=40, window=8).tolist() == [
        [8, 13, 50]]


def test_no_compression_when_budget_reaches_the_prompt():
    caps = torch.tensor([[0, 5, 100]])
    assert not compresses(40, 40)  # the reference compresses here; we do not
    assert compresses(41, 40)
    assert kept_counts(caps, prompt_len=40, budget=40, window=8).tolist() == [
        [40, 40, 40]]
    assert kept_counts(caps, prompt_len=3, budget=40, window=8).tolist() == [
        [3, 3, 3]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=32), "larger than the window"),
    (dict(budget=10), "larger than the window"),
    (dict(budget=64, window=0), "window must be a positive"),
    (dict(budget=64, ratio=1.5), "ratio"),
    (dict(budget=64, ratio=-0.1), "ratio"),
    (dict(budget=64.5), "integer"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        head_budgets(torch.ones(2, 2), 2, **kwargs)


def test_heads_must_split_into_kv_groups():
    with pytest.raises(ValueError, match="cannot be split into 3 KV heads"):
        head_budgets(torch.ones(2, 4), 3, 64)
    with pytest.raises(ValueError, match="positive sum"):
        head_budgets(torch.zeros(2, 4), 2, 64)
