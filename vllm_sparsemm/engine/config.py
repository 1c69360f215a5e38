"""SparseMM settings: ``--additional-config '{"sparsemm": {...}}'``, env fallbacks, score lookup.

Precedence: ``--additional-config`` > ``VLLM_SPARSEMM_*`` environment
variables > defaults. Everything is validated when vLLM builds its config, so a
bad setting fails at start-up with a message naming the fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from vllm_sparsemm.core.budget import check_budget_args
from vllm_sparsemm.core.scores import (HeadScoreError, check_scores_fit,
                                       load_head_scores, resolve_score_file)

UNIFORM = "uniform"

# Shipped score files and the model shapes they were computed for:
# (file name, architectures, (layers, query heads, KV heads, hidden size, vocab)).
KNOWN_SCORE_FILES = (
    ("llava-v1.6-vicuna-7b", ("LlavaNextForConditionalGeneration", ),
     (32, 32, 32, 4096, 32064)),
)


DECODE_KERNELS = ("flash_attn", "triton")


@dataclass(frozen=True)
class SparseMMSettings:
    """User-facing knobs (DESIGN section 3)."""
    budget: int = 256  # B: tokens per KV head on average, window included
    window: int = 32  # W: observation window, always kept
    ratio: float = 0.1  # r: share of B - W every head gets regardless of score
    pool_kernel: int = 5  # avg-pool kernel over key scores
    head_scores: str | None = None  # path, shipped name, "uniform", or auto
    # steps ahead the admission gate checks that, with every request running
    # to its max_tokens, the pool never runs out (-1: until all finish; 0:
    # vLLM's optimistic admission, and no pacing); see admission.py
    admission_reserve: int = 256
    # compressed requests start no faster than the pool can sustain, so a
    # burst does not grow and finish in lockstep (admission.AdmissionPacer)
    admission_pacing: bool = True
    # uniform decode steps (every row one token, none in its prompt) replay
    # full CUDA graphs (graph_decode.py); off: they run piecewise, with the
    # attention eager between graphs (slower decode: docs/benchmarks.md)
    full_cuda_graphs: bool = True
    # decode attention of the per-head page lists: the Triton split-K kernel
    # (triton_ops.paged_decode), or FlashAttention over a page table
    # (docs/benchmarks.md compares them)
    decode_kernel: str = "triton"
    # the debug safety net: NaN-fill what nobody may read, check every
    # block-table column on the GPU too
    debug_poison: bool = False
    # GiB of shared CPU memory keeping vision-encoder outputs, so a prefix
    # hit that recomputes image tokens (the observation window after a short
    # question) does not run the encoder again (encoder_cache.py); 0: off
    encoder_cpu_cache_gib: float = 0.0

    def __post_init__(self):
        check_budget_args(self.budget, self.window, self.ratio)
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"sparsemm pool_kernel must be odd and positive, "
                             f"got {self.pool_kernel}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"sparsemm decode_kernel must be one of "
                             f"{list(DECODE_KERNELS)}, got "
                             f"{self.decode_kernel!r}")
        if not 0 <= self.encoder_cpu_cache_gib < float("inf"):
            raise ValueError(f"sparsemm encoder_cpu_cache_gib must be a size "
                             f"in GiB, 0 or more, got "
                             f"{self.encoder_cpu_cache_gib}")
        if self.admission_reserve < -1:
            raise ValueError(f"sparsemm admission_reserve must be -1 (until "
                             f"every request finishes), 0 (off) or a step "
                             f"count, got "
                             f"{self.admission_reserve}")

    @classmethod
    def from_sources(cls, additional_config: dict | None,
                     environ=os.environ) -> "SparseMMSettings":
        raw = (additional_config or {}).get("sparsemm")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(
                f"--additional-config \"sparsemm\" must be a JSON object of "
                f"settings, e.g. {{\"sparsemm\": {{\"budget\": 128}}}}, got "
                f"{type(raw).__name__} {raw!r:.80}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"unknown sparsemm settings {unknown}; valid: "
                             f"{sorted(known)}")
        values = {}
        for name, f in known.items():
            origin = _environment_name(name)
            value = raw.get(name, environ.get(origin))
            if value is None:
                continue
            if name in raw:
                origin = "--additional-config"
            try:
                values[name] = _PARSERS[f.type](value)
            except ValueError as e:
                hint = _HINTS.get(name, "")
                raise ValueError(f"sparsemm setting {name}={value!r:.80} (from "
                                 f"{origin}): {e}{hint}") from None
        return cls(**values)


def _environment_name(setting: str) -> str:
    return f"VLLM_SPARSEMM_{setting.upper()}"


def setting_environment_names() -> list[str]:
    """The variable that sets each setting when no config names it."""
    return [_environment_name(f.name)
            for f in dataclasses.fields(SparseMMSettings)]


# Strict on purpose: a silent coercion (128.7 -> 128, true -> 1, 5 -> "5")
# would run the model with a setting the user never meant.
def _as_int(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):  # the environment holds strings
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError("expected a whole number such as 64 (not a fraction, "
                     "not true/false)")


def _as_float(value) -> float:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    raise ValueError("expected a number such as 0.1 (not true/false)")


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no"):
        return False
    raise ValueError('expected a boolean: true or false (or the strings '
                     '"1"/"0", "yes"/"no")')


def _as_str(value) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("expected a string")


_PARSERS = {"int": _as_int, "float": _as_float, "bool": _as_bool,
            "str": _as_str, "str | None": _as_str}  # by field annotation
_HINTS = {
    "head_scores": ": a score-file path, a shipped name or \"uniform\"",
    "decode_kernel": f": one of {list(DECODE_KERNELS)}",
}


def find_score_file(architectures, num_layers: int, num_heads: int,
                    num_kv_heads: int, hidden_size: int, vocab_size: int):
    """The shipped score file computed for this model shape, or None."""
    shape = (num_layers, num_heads, num_kv_heads, hidden_size, vocab_size)
    for name, archs, known_shape in KNOWN_SCORE_FILES:
        if shape == known_shape and set(architectures or ()) & set(archs):
            return name
    return None


@dataclass(frozen=True)
class ModelShape:
    architectures: tuple[str, ...]
    num_layers: int
    num_heads: int  # query heads, whole model (all TP ranks)
    num_kv_heads: int  # whole model
    hidden_size: int
    vocab_size: int

    @classmethod
    def from_hf_text_config(cls, architectures, text) -> "ModelShape":
        return cls(tuple(architectures or ()), text.num_hidden_layers,
                   text.num_attention_heads,
                   getattr(text, "num_key_value_heads", None)
                   or text.num_attention_heads, text.hidden_size,
                   text.vocab_size)


def resolve_scores(settings: SparseMMSettings,
                   shape: ModelShape) -> tuple[torch.Tensor, str]:
    """Scores ``[L, Hq]`` for the model and a description of where they came from."""
    source = settings.head_scores
    if source == UNIFORM:
        return (torch.ones(shape.num_layers, shape.num_heads,
                           dtype=torch.float64),
                "uniform (every head alike: plain SnapKV, no visual heads)")
    if source is None:
        source = find_score_file(shape.architectures, shape.num_layers,
                                 shape.num_heads, shape.num_kv_heads,
                                 shape.hidden_size, shape.vocab_size)
        if source is None:
            raise HeadScoreError(
                f"sparsemm has no visual-head score file for this model "
                f"({', '.join(shape.architectures) or 'unknown architecture'}"
                f", {shape.num_layers} layers x {shape.num_heads} heads). "
                f"Compute one with `vllm-sparsemm chase` and pass "
                f"--additional-config '{{\"sparsemm\": {{\"head_scores\": "
                f"\"/path/to/scores.json\"}}}}', or opt into uniform budgets "
                f"(plain SnapKV) with \"head_scores\": \"uniform\"")
    path = resolve_score_file(source)
    scores = load_head_scores(path)
    check_scores_fit(scores, shape.num_layers, shape.num_heads, str(path))
    return scores, str(path)
