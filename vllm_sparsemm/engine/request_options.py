"""Per-request options: the ``sparsemm_*`` keys of ``SamplingParams.extra_args``
(``vllm_xargs`` in an OpenAI request).

``sparsemm_budget``: the request's own B (an integer above the window), or 0
/ ``"off"`` for no compression. Checked where vLLM builds the request's
sampling parameters, so a bad value is the client's error (HTTP 400 from the
server, ``ValueError`` offline), and normalised there to an int that the
scheduler and the workers read.
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError

PREFIX = "sparsemm_"
BUDGET = "sparsemm_budget"
OFF = 0


def check_request_options(extra_args: dict | None, window: int) -> None:
    """Validate (and normalise in place) the ``sparsemm_*`` keys of ``extra_args``."""
    if not extra_args:
        return
    unknown = sorted(k for k in extra_args
                     if str(k).startswith(PREFIX) and k != BUDGET)
    if unknown:
        raise VLLMValidationError(
            f"unknown per-request sparsemm option {unknown[0]!r}; the only "
            f"one is {BUDGET!r}", parameter=f"vllm_xargs.{unknown[0]}",
            value=extra_args[unknown[0]])
    if BUDGET in extra_args:
        extra_args[BUDGET] = _budget(extra_args[BUDGET], window)


def _budget(value, window: int) -> int:
    budget = None
    if isinstance(value, int) and not isinstance(value, bool):
        budget = value
    elif isinstance(value, str):
        text = value.strip().lower()
        budget = OFF if text == "off" else (
            int(text) if text.lstrip("-").isdigit() else None)
    if budget is None or (budget != OFF and budget <= window):
        raise VLLMValidationError(
            f"{BUDGET} must be an integer above the window ({window}) or 0 / "
            f"\"off\" for no compression, got {value!r}",
            parameter=f"vllm_xargs.{BUDGET}", value=value)
    return budget


def request_budget(extra_args: dict | None) -> int | None:
    """The budget a (validated) request asks for: None for the server's
    default, ``OFF`` (0) for no compression."""
    if not extra_args:
        return None
    return extra_args.get(BUDGET)


def runs_to_limit(params) -> bool:
    """Whether a request generates all of its ``max_tokens``: it ignores EOS
    and has no stop token (stop strings end it in the API server), or it
    must generate them all anyway (``min_tokens``). Else its limit bounds
    its answer and does not predict it."""
    if params is None:
        return True
    if params.max_tokens is not None and params.min_tokens >= params.max_tokens:
        return True
    return bool(params.ignore_eos and not params.stop_token_ids
                and not params.stop)
