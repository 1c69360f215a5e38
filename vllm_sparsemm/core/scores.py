"""Visual-head score files: loading, validation and lookup.

A score file is the SparseMM authors' format: one JSON object whose keys are
``"<layer>-<query head>"`` and whose values are lists of numbers (one per
calibration image or run). The score of a head is the mean of its list.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

import torch

_KEY = re.compile(r"^(0|[1-9][0-9]*)-(0|[1-9][0-9]*)$")

# Shipped score files live in the repository's top-level ``head_scores/``; an
# installed wheel carries the same files as ``vllm_sparsemm/score_files``.
_PACKAGE = Path(__file__).resolve().parent.parent
_SHIPPED_DIRS = (
    _PACKAGE.parent / "head_scores",  # a checkout
    _PACKAGE / "score_files",  # an installed wheel
)


class HeadScoreError(ValueError):
    """A score file is missing, malformed, or does not fit the model."""


def parse_head_scores(data: object, source: str = "<scores>") -> torch.Tensor:
    """Turn the authors' JSON object into a float64 tensor ``[L, Hq]``.

    Every key must be ``"<layer>-<head>"``, the keys must form the full
    ``L x Hq`` grid, every list must be non-empty, finite and non-negative, and
    at least one head must score above zero (the budgets normalise by the sum).
    """
    if not isinstance(data, dict) or not data:
        raise HeadScoreError(
            f"{source}: expected a non-empty JSON object mapping "
            f"'<layer>-<head>' to a list of numbers")
    cells: dict[tuple[int, int], float] = {}
    for key, values in data.items():
        match = _KEY.match(str(key))
        if match is None:
            raise HeadScoreError(
                f"{source}: malformed key {key!r}; keys must look like "
                f"'<layer>-<head>', e.g. '0-7'")
        if (not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values)):
            raise HeadScoreError(
                f"{source}: value of {key!r} must be a non-empty list of "
                f"numbers, got {values!r:.80}")
        try:  # JSON integers have no size limit; a float does
            values = [float(v) for v in values]
        except OverflowError:
            raise HeadScoreError(
                f"{source}: {key!r} holds a number too large for a float; "
                f"scores must be finite non-negative numbers") from None
        if not all(math.isfinite(v) for v in values):
            raise HeadScoreError(f"{source}: {key!r} holds a non-finite value")
        if any(v < 0 for v in values):
            raise HeadScoreError(f"{source}: {key!r} holds a negative value")
        cells[(int(match.group(1)), int(match.group(2)))] = (
            sum(values) / len(values))

    num_layers = 1 + max(layer for layer, _ in cells)
    num_heads = 1 + max(head for _, head in cells)
    if len(cells) != num_layers * num_heads:
        # lazily: a key such as '0-99999999999' must not build the whole grid
        missing = ((l, h) for l in range(num_layers)
                   for h in range(num_heads) if (l, h) not in cells)
        shown = ", ".join(f"'{l}-{h}'" for l, h in itertools.islice(missing, 5))
        raise HeadScoreError(
            f"{source}: keys do not form a full {num_layers} x {num_heads} "
            f"(layers x heads) grid; {num_layers * num_heads - len(cells)} "
            f"missing, e.g. {shown}")
    scores = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    for (layer, head), value in cells.items():
        scores[layer, head] = value
    if not bool((scores > 0).any()):
        raise HeadScoreError(f"{source}: every head scores 0; budgets "
                             f"cannot be derived from an all-zero file")
    if not math.isfinite(float(scores.sum())):
        raise HeadScoreError(f"{source}: the head scores sum past the float "
                             f"range (budgets divide by the sum); scale the "
                             f"file down")
    return scores


def load_head_scores(path: str | os.PathLike) -> torch.Tensor:
    """Load a score file; returns the per-head mean scores, shape ``[L, Hq]``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise HeadScoreError(f"cannot read head-score file {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HeadScoreError(f"{path}: not valid JSON ({e})") from e
    except (ValueError, RecursionError):  # a >4300-digit integer; deep nesting
        raise HeadScoreError(
            f"{path}: not a usable score file: it holds a number too long to "
            f"read or lists nested too deep; values must be finite "
            f"non-negative numbers") from None
    return parse_head_scores(data, source=str(path))


def check_scores_fit(scores: torch.Tensor, num_layers: int, num_heads: int,
                     source: str = "head scores") -> None:
    """Fail clearly when a score grid does not match the model it serves."""
    if tuple(scores.shape) != (num_layers, num_heads):
        raise HeadScoreError(
            f"{source} cover {scores.shape[0]} layers x {scores.shape[1]} "
            f"query heads, but the model has {num_layers} layers x "
            f"{num_heads} query heads; use a score file computed for this "
            f"model (see `vllm-sparsemm chase`)")


def shipped_score_files() -> dict[str, Path]:
    """Names (file stems) of the score files shipped with the package."""
    found: dict[str, Path] = {}
    for directory in _SHIPPED_DIRS:
        if directory.is_dir():
            for file in sorted(directory.glob("*.json")):
                found.setdefault(file.stem, file)
    return found


def resolve_score_file(name_or_path: str | os.PathLike) -> Path:
    """Map a path, or the name of a shipped file (``llava-v1.6-vicuna-7b``), to a file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_score_files()
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    if stem in shipped and str(name_or_path) in (stem, stem + ".json"):
        return shipped[stem]
    raise HeadScoreError(
        f"head-score file {str(name_or_path)!r} not found: give an existing "
        f"JSON path or one of the shipped names {sorted(shipped)}")
