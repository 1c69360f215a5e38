"""When the scheduler may admit another request: the future peak of the pool,
and a pace that keeps a burst of compressed requests from moving in lockstep.

A compressed request holds its whole prompt's blocks while it prefills, the
prompt and its compacted blocks for a step or two, then the compacted blocks
alone, and one more block per ``block_size`` output tokens (at B=64 on
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
  over the life) lets requests of all ages share the pool: a larger mean
  decode batch on vLLM's own scheduler (``benchmarks/scheduler_sim.py``),
  with no preemption.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from vllm_sparsemm.core.block_law import BlockLaw, LawBook
from vllm_sparsemm.core.pages import cdiv


class FutureRow(NamedTuple):
    """One request, as :func:`future_peak` sees it."""
    prompt: int  # prompt length
    tokens: int  # tokens with a slot
    limit: int  # prompt + max_tokens: slots stop one token before it
    prefill_steps: int  # prefill steps still to run after this one
    # blocks of the whole prompt (standard layout) it holds until they go
    # back after compaction; 0 when not compressed or once they went back
    whole: int
    held: int  # blocks held now
    release: int  # the first step (from now) without the ``whole`` blocks
    budget: int  # its law's budget in the ``LawBook`` (0: not compressed)


def future_peak(rows, book: LawBook, horizon: int) -> int:
    """Most blocks the requests of ``rows`` (:class:`FutureRow` each) hold
    together at any step from now (step 0) to ``horizon`` steps ahead (-1:
    until all finish).

    A request adds one token per step once its prefill is done. A compressed
    one holds its whole prompt while it prefills, the prompt and its
    compacted blocks from the compaction step until the prompt goes back
    (``release``: the scheduler hands it back once the step's output is
    processed), and the compacted blocks after. Between two events (a
    release, a finish) every count only grows, so the peak is at step 0,
    step 1 or the last step before an event.

    Requests past their prefill and release (nearly all of them) grow by one
    block per ``block_size`` tokens from an offset set by their phase
    (``BlockLaw.phase_blocks``), so they are summed per (budget, prompt
    length, phase) from counts of who is still alive: the cost grows with
    the number of such groups and event steps, not with their product with
    requests (or, where groups outnumber requests, request by request).
    """
    table = np.array(rows, dtype=np.int64).reshape(-1, len(FutureRow._fields))
    cols = FutureRow(*table.T)
    after_prompt, last = _life(cols)
    times = np.unique(np.concatenate(
        ([0, 1], np.maximum(cols.release - 1, 0), np.maximum(last, 0))))
    if horizon >= 0:
        times = np.append(times[times <= horizon], horizon)
    steady = (cols.prefill_steps == 0) & (cols.whole == 0)
    dense = _dense_blocks(FutureRow(*table[~steady].T), book, times)
    total = dense.sum(axis=0)
    steady_cols = FutureRow(*table[steady].T)
    if steady.any():
        pairs, group = _groups(steady_cols)
        total += _steady_blocks(book, pairs, group, after_prompt[steady],
                                last[steady], times)
    # step 0 counts what each request holds now, which the steady sums omit
    total[0] = (dense[:, 0].sum() +
                _dense_blocks(steady_cols, book, times[:1]).sum())
    return int(total.max())


def _groups(cols: FutureRow) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The distinct (budget, prompt length) pairs of ``cols``, and each
    row's index among them."""
    keys, group = np.unique(cols.budget << 32 | cols.prompt,
                            return_inverse=True)
    pairs = [(int(key) >> 32, int(key) & 0xFFFFFFFF) for key in keys]
    return pairs, group.reshape(-1)


def _compressing(book: LawBook, budget: int,
                 prompt_len: int) -> BlockLaw | None:
    """The law that compresses a (budget, prompt) pair's requests, if any."""
    law = book.law(budget) if budget else None
    return law if law is not None and law.compresses(prompt_len) else None


# cells of a (group, phase, time) table that _steady_blocks builds at once
_CELLS = 1 << 18


def _steady_blocks(book: LawBook, pairs: list[tuple[int, int]],
                   group: np.ndarray, appended: np.ndarray, last: np.ndarray,
                   times: np.ndarray) -> np.ndarray:
    """Blocks ``[times]`` that steady requests hold together: request i, of
    (budget, prompt length) ``pairs[group[i]]``, ``appended[i]`` tokens past
    its prompt now and alive up to step ``last[i]``, holds ``(appended[i] +
    t) // bs + offsets[(appended[i] + t) % bs]`` at step t, its pair's
    offsets. Counted per (pair, phase ``appended % bs``) from histograms of
    when each request's life ends, all pairs in a few array operations (in
    chunks of at most ``_CELLS`` table cells): the cost does not grow with
    the requests. When the pairs are many (a chat load's prompt lengths)
    and so few requests share one, each request is counted on its own
    instead, which costs less than the table."""
    bs = book.block_size
    offsets = np.stack([_phase_offsets(book, *pair) for pair in pairs])
    if len(appended) <= len(pairs) * bs:
        return _each_request(offsets, group, appended, last, times, bs)
    width = len(times) + 1
    # request i is alive at times[j] for j < ends[i]
    ends = np.searchsorted(times, last, side="right")
    total = np.bincount(ends, weights=appended // bs, minlength=width)[
        ::-1].cumsum()[::-1][1:].astype(np.int64)
    u = np.arange(bs)[:, None] + times[None, :]  # phase + t: [bs, times]
    cell = (group * bs + appended % bs) * width + ends
    chunk = max(1, _CELLS // (bs * width))
    for first in range(0, len(pairs), chunk):
        count = min(chunk, len(pairs) - first)
        mine = (group >= first) & (group < first + count)
        per_end = np.bincount(cell[mine] - first * bs * width,
                              minlength=count * bs * width)
        # alive[g, p, j]: requests of pair first + g, phase p, alive at j
        alive = per_end.reshape(count * bs, width)[:, ::-1].cumsum(
            axis=1)[:, ::-1][:, 1:].reshape(count, bs, -1)
        per_phase = u // bs + offsets[first:first + count][:, u % bs]
        total += (alive * per_phase).sum(axis=(0, 1))
    return total


def _each_request(offsets: np.ndarray, group: np.ndarray,
                  appended: np.ndarray, last: np.ndarray, times: np.ndarray,
                  bs: int) -> np.ndarray:
    """``_steady_blocks`` request by request (rows in chunks of at most
    ``_CELLS`` cells)."""
    total = np.zeros(len(times), dtype=np.int64)
    chunk = max(1, _CELLS // len(times))
    for first in range(0, len(appended), chunk):
        rows = slice(first, first + chunk)
        u = appended[rows, None] + times[None, :]  # [requests, times]
        blocks = u // bs + offsets[group[rows, None], u % bs]
        total += np.where(times[None, :] <= last[rows, None], blocks,
                          0).sum(axis=0)
    return total


def _phase_offsets(book: LawBook, budget: int, prompt_len: int) -> np.ndarray:
    """``[bs]``: the list length, less ``a // bs``, of a request of the pair
    ``a`` tokens past its prompt, by ``a % bs``."""
    law = _compressing(book, budget, prompt_len)
    if law is not None:
        return law.phase_blocks(prompt_len)
    bs = book.block_size
    return cdiv(prompt_len + np.arange(bs), bs)


def _life(cols: FutureRow) -> tuple[np.ndarray, np.ndarray]:
    """Per request: tokens after the prompt once its prefill is done, and
    the last step (from now) at which it still holds blocks."""
    after_prompt = np.maximum(cols.tokens, cols.prompt) - cols.prompt
    return after_prompt, (cols.prefill_steps + (cols.limit - cols.prompt) -
                          after_prompt - 1)


def _dense_blocks(cols: FutureRow, book: LawBook,
                  times: np.ndarray) -> np.ndarray:
    """Blocks ``[requests, times]`` of each request at each step
    (``future_peak``'s rule, evaluated request by request)."""
    after_prompt, last = _life(cols)
    t = times[None]
    steps = cols.prefill_steps[:, None]
    appended = np.maximum(after_prompt[:, None] + t - steps, 0)
    blocks = cdiv(cols.prompt[:, None] + appended, book.block_size)
    pairs, group = _groups(cols)
    for g, (budget, prompt_len) in enumerate(pairs):
        law = _compressing(book, budget, prompt_len)
        if law is not None:
            same = group == g
            blocks[same] = law.compacted_blocks_many(prompt_len,
                                                     appended[same])
    pending = (cols.whole > 0)[:, None]
    whole = cols.whole[:, None]
    # prefilling: the prompt only; then the prompt and the compacted blocks
    blocks = (np.where(pending & (t < steps), 0, blocks) +
              np.where(pending & (t < cols.release[:, None]), whole, 0))
    blocks = np.where(t <= last[:, None], blocks, 0)
    blocks[:, 0] = np.maximum(blocks[:, 0], cols.held)
    return blocks


class AdmissionPacer:
    """A token bucket for admitting compressed requests.

    Its rate is the steady state the pool can hold: requests whose life is
    ``out`` output tokens and whose blocks average ``mean`` over that life
    fit ``pool / mean`` at a time, so one may start every ``out * mean /
    pool`` steps. It holds at most ``BURST`` of that concurrency (at least
    one request), which a burst may start at once. ``out`` is the mean
    output length of the requests that finished, never more than the
    candidate's own limit. Before any has finished it is the candidate's
    ``max_tokens`` if the candidate runs to it (EOS ignored); otherwise
    there is nothing to pace by: an answer may stop far short of its limit
    (a chat client that leaves ``max_tokens`` unset gets all of
    ``max_model_len``), and pacing by the limit would hold requests back
    that stock vLLM starts at once.
    """

    BURST = 0.1  # share of the steady concurrency that may start at once
    SMOOTHING = 1 / 16  # weight of each finished request in the mean output

    def __init__(self, book: LawBook, pool_blocks: int):
        self.book = book
        self.pool_blocks = pool_blocks
        self.step = 0
        self._tokens = math.inf  # capped at the first look
        self._updated = 0
        self.mean_output: float | None = None
        self._rates: dict[tuple, tuple[float, float]] = {}

    def new_step(self) -> None:
        self.step += 1

    def rate(self, law: BlockLaw, prompt_len: int,
             out: int) -> tuple[float, float]:
        """(admissions per step, bucket size) for requests of this shape."""
        key = (law.plan.budget, prompt_len, out)
        if key not in self._rates:
            if len(self._rates) > 4096:
                self._rates.clear()
            mean = float(law.compacted_blocks_many(prompt_len,
                                                   np.arange(out)).mean())
            pool = self.pool_blocks - cdiv(prompt_len, law.block_size)
            concurrency = max(pool, 1) / mean
            self._rates[key] = (concurrency / out,
                                max(1.0, self.BURST * concurrency))
        return self._rates[key]

    def allows(self, law: BlockLaw | None, prompt_len: int,
               max_output: int, runs_to_limit: bool = True) -> bool:
        """Whether a request of this shape (its budget's ``law``) may start
        now (refills the bucket); ``runs_to_limit``: it generates all of its
        ``max_output`` tokens (class docstring)."""
        out = max_output
        if self.mean_output is not None:
            out = min(out, max(1, round(self.mean_output)))
        elif not runs_to_limit:
            return True  # no finished request yet says how long answers run
        if out < 1 or law is None or not law.compresses(prompt_len):
            return True
        rate, size = self.rate(law, prompt_len, out)
        self._tokens = min(size, self._tokens + rate *
                           (self.step - self._updated))
        self._updated = self.step
        return self._tokens >= 1

    def started(self, law: BlockLaw | None, prompt_len: int) -> None:
        """A request of that prompt length was admitted."""
        if (law is not None and law.compresses(prompt_len)
                and self._tokens != math.inf):
            self._tokens -= 1

    def finished(self, num_output_tokens: int) -> None:
        """A request ran to its end (not preempted or aborted)."""
        if self.mean_output is None:
            self.mean_output = float(num_output_tokens)
        else:
            self.mean_output += self.SMOOTHING * (num_output_tokens -
                                                  self.mean_output)
