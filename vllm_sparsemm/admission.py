"""When the scheduler may admit another request: the future peak of the pool,
and a pace that keeps a burst of compressed requests from moving in lockstep.

A compressed request holds its whole prompt's blocks for a step or two, then
few, then one more block per ``block_size`` output tokens (at B=64 on
LLaVA-NeXT: ~6 blocks after compaction, ~38 after 512 outputs). vLLM admits a
request when its prompt fits in the free blocks and, when a running request
cannot grow, preempts the newest one, which then recomputes its whole prompt.
Two rules make admission fit that life:

* :func:`future_peak`: admit only if, with every request (the new one too)
  running to its ``max_tokens``, no step within the horizon needs more blocks
  than the pool has. Finishing requests give their blocks back, so this is
  exact for requests that run to their limit, and an early stop only frees
  blocks sooner.
* :class:`AdmissionPacer`: requests admitted together grow together and finish
  together, so the pool must hold all of their final sizes at once, about
  twice their mean size over a life. Admitting compressed requests no faster
  than the pool can sustain (``pool / mean blocks`` requests per life, spread
  over the life) lets requests of all ages share the pool. On vLLM's own
  scheduler (``examples/scheduler_sim.py``, 8 GiB of KV, LLaVA-NeXT, 256
  requests of 512 output tokens) this takes the mean decode batch from ~31 to
  ~40 at B=64 with no preemption.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from vllm_sparsemm.block_law import BlockLaw
from vllm_sparsemm.page_plan import cdiv

# Columns of the rows handed to ``future_peak``, one row per request (see its
# docstring): prompt, tokens, limit, prefill steps, whole prompt, held.
HELD = 5


def future_peak(rows: np.ndarray, law: BlockLaw, horizon: int) -> int:
    """Most blocks the requests of ``rows`` hold together at any step from
    now (step 0) to ``horizon`` steps ahead (-1: until all finish).

    ``rows``: int ``[requests, 6]``: prompt length; tokens with a slot;
    limit (prompt + max_tokens: slots stop one token before it); prefill
    steps still to run; the whole prompt's blocks while it is held until
    compaction (0 once compacted or when not compressed); blocks held now.
    A request adds one token per step once its prefill is done; it holds its
    whole prompt until one step after its prefill (the scheduler releases a
    compaction when the step's output is processed). Between two events (the
    end of a transient, a finish) every count only grows, so the peak is at
    step 0, step 1 or the last step before an event.

    Requests past their prefill and transient (nearly all of them) grow by
    one block per ``block_size`` tokens from an offset set by their phase
    (``BlockLaw.phase_blocks``), so they are summed per (prompt length,
    phase) from counts of who is still alive: the cost grows with the number
    of such groups and event steps, not with their product with requests.
    """
    prompt, _, _, prefill_steps, whole, _ = rows.T
    bs = law.block_size
    after_prompt, last = _life(rows)
    times = np.unique(np.concatenate(
        ([0, 1], prefill_steps + 1, np.maximum(last, 0))))
    if horizon >= 0:
        times = np.append(times[times <= horizon], horizon)
    steady = (prefill_steps == 0) & (whole == 0)
    dense = _dense_blocks(rows[~steady], law, times)
    total = dense.sum(axis=0)
    for prompt_len in np.unique(prompt[steady]):
        group = steady & (prompt == prompt_len)
        total += _steady_blocks(law, int(prompt_len), after_prompt[group],
                                last[group], times)
    # step 0 counts what each request holds now, which the steady sums omit
    total[0] = (dense[:, 0].sum() +
                _dense_blocks(rows[steady], law, times[:1]).sum())
    return int(total.max())


def _steady_blocks(law: BlockLaw, prompt_len: int, appended: np.ndarray,
                   last: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Blocks ``[times]`` that steady requests of one prompt length hold
    together: request i, ``appended[i]`` tokens past its prompt now and
    alive up to step ``last[i]``, holds ``(appended[i] + t) // bs +
    offsets[(appended[i] + t) % bs]`` at step t. Counted per phase
    ``appended % bs`` from histograms of when each request's life ends, so
    the cost does not grow with the requests or phases present."""
    bs = law.block_size
    offsets = (law.phase_blocks(prompt_len) if law.compresses(prompt_len)
               else cdiv(prompt_len + np.arange(bs), bs))
    phase, base = appended % bs, appended // bs
    # request i is alive at times[j] for j < ends[i]
    ends = np.searchsorted(times, last, side="right")
    width = len(times) + 1
    per_end = np.bincount(phase * width + ends, minlength=bs * width)
    # alive[p, j]: requests of phase p alive at times[j]
    alive = per_end.reshape(bs, width)[:, ::-1].cumsum(axis=1)[:, ::-1][:, 1:]
    base_alive = np.bincount(ends, weights=base,
                             minlength=width)[::-1].cumsum()[::-1][1:]
    u = np.arange(bs)[:, None] + times[None, :]
    per_phase = u // bs + offsets[u % bs]  # [bs, times]
    return (base_alive.astype(np.int64) +
            (alive * per_phase).sum(axis=0))


def _life(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request of ``rows``: tokens after the prompt once its prefill is
    done, and the last step (from now) at which it still holds blocks."""
    prompt, tokens, limit, prefill_steps = rows[:, :4].T
    after_prompt = np.maximum(tokens, prompt) - prompt
    return after_prompt, prefill_steps + (limit - prompt) - after_prompt - 1


def _dense_blocks(rows: np.ndarray, law: BlockLaw,
                  times: np.ndarray) -> np.ndarray:
    """Blocks ``[requests, times]`` of each request of ``rows`` at each step
    (``future_peak``'s rule, evaluated request by request)."""
    prompt, _, _, prefill_steps, whole, held = rows.T
    after_prompt, last = _life(rows)
    appended = np.maximum(
        after_prompt[:, None] + times[None] - prefill_steps[:, None], 0)
    blocks = cdiv(prompt[:, None] + appended, law.block_size)
    for prompt_len in np.unique(prompt):
        if law.compresses(int(prompt_len)):
            same = prompt == prompt_len
            blocks[same] = law.compacted_blocks_many(int(prompt_len),
                                                     appended[same])
    transient = np.where(times[None] <= prefill_steps[:, None] + 1,
                         whole[:, None], 0)
    blocks = np.where(times[None] <= last[:, None],
                      np.maximum(blocks, transient), 0)
    blocks[:, 0] = np.maximum(blocks[:, 0], held)
    return blocks


class AdmissionPacer:
    """A token bucket for admitting compressed requests.

    Its rate is the steady state the pool can hold: requests whose life is
    ``out`` output tokens and whose blocks average ``mean`` over that life
    fit ``pool / mean`` at a time, so one may start every ``out * mean /
    pool`` steps. It holds at most ``BURST`` of that concurrency (at least
    one request), which a burst may start at once. ``out`` is the mean
    output length of the requests that finished (none yet: the candidate's
    ``max_tokens``), never more than the candidate's own limit.
    """

    BURST = 0.1  # share of the steady concurrency that may start at once
    SMOOTHING = 1 / 16  # weight of each finished request in the mean output

    def __init__(self, law: BlockLaw, pool_blocks: int):
        self.law = law
        self.pool_blocks = pool_blocks
        self.step = 0
        self._tokens = math.inf  # capped at the first look
        self._updated = 0
        self.mean_output: float | None = None

    def new_step(self) -> None:
        self.step += 1

    @functools.lru_cache(maxsize=4096)
    def rate(self, prompt_len: int, out: int) -> tuple[float, float]:
        """(admissions per step, bucket size) for requests of this shape."""
        mean = float(self.law.compacted_blocks_many(
            prompt_len, np.arange(out)).mean())
        pool = self.pool_blocks - cdiv(prompt_len, self.law.block_size)
        concurrency = max(pool, 1) / mean
        return concurrency / out, max(1.0, self.BURST * concurrency)

    def allows(self, prompt_len: int, max_output: int) -> bool:
        """Whether a request of this shape may start now (refills the bucket)."""
        out = max_output
        if self.mean_output is not None:
            out = min(out, max(1, round(self.mean_output)))
        if out < 1 or not self.law.compresses(prompt_len):
            return True
        rate, size = self.rate(prompt_len, out)
        self._tokens = min(size, self._tokens + rate *
                           (self.step - self._updated))
        self._updated = self.step
        return self._tokens >= 1

    def started(self, prompt_len: int) -> None:
        """A request of that prompt length was admitted."""
        if self.law.compresses(prompt_len) and self._tokens != math.inf:
            self._tokens -= 1

    def finished(self, num_output_tokens: int) -> None:
        """A request ran to its end (not preempted or aborted)."""
        if self.mean_output is None:
            self.mean_output = float(num_output_tokens)
        else:
            self.mean_output += self.SMOOTHING * (num_output_tokens -
                                                  self.mean_output)
