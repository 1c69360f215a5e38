"""vLLM's own scheduler on the CPU, stepped under a cost model of an H100: how
admission and preemption shape throughput, without a GPU.

    python benchmarks/scheduler_sim.py --budget 256,64 --admission-reserve 0,256

Runs vLLM 0.26.0's ``Scheduler`` with a stock ``FullAttentionSpec`` manager
and with sparsemm's manager, over one burst of identical requests (prefix
caching off), or a closed loop of clients with prefix caching on: questions
about shared images (``--chat-images``) or conversations (``--conversations``),
and charges each step ``max(weights read, tokens x per-token
compute) + KV bytes that decoding rows hold / bandwidth``, plus optional
fixed costs per step and per prompt begun (CostModel.step).
Output: steps, modelled seconds and output tok/s, recompute preemptions and
the prompt tokens they threw away, peak running requests, modelled time to
first token, the prefix-cache hit rate, and the wall time
vLLM's scheduler itself took per step on this CPU (host time that a GPU step
must hide). It is a model, not a measurement: docs/benchmarks.md says how
close it came to measured runs, and with which fitted costs.

``--no-prefill-transient`` models a design sparsemm does not have yet: each
prompt prefilled in one step (chunked prefill off) and written straight into
its compressed pages, so a request never holds its whole prompt's blocks
(``without_prefill_transient``). It bounds what that design would buy.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CostModel:
    """Seconds per step on an H100 for a 7B fp16 model (see the module docstring)."""
    weights_s: float = 4.5e-3  # 13.5 GB of weights read once per step
    token_s: float = 21.5e-6  # 14 GFLOP per token at ~650 TFLOP/s
    kv_bytes_per_s: float = 2.4e12  # what FlashAttention reached on decode
    block_bytes: int = 16 * 32 * 32 * 2 * 128 * 2  # 7B: 16 tokens, 32 x 32 heads

    step_s: float = 0.0  # per step besides matmuls and attention
    prompt_s: float = 0.0  # per prompt begun (its image through the vision tower)

    def step(self, prefill_tokens: int, decode_rows: int,
             decode_blocks: int, prompts_begun: int = 0) -> float:
        """The matmuls read the weights or compute, whichever is longer
        (decode rows compute too: 298 of them took 6.6 ms of matmuls on the
        H100), then decoding rows read their KV."""
        matmuls = max(self.weights_s,
                      (prefill_tokens + decode_rows) * self.token_s)
        return (matmuls + decode_blocks * self.block_bytes /
                self.kv_bytes_per_s + self.step_s +
                prompts_begun * self.prompt_s)


def write_text_model(path: Path, layers: int = 32, heads: int = 32) -> Path:
    """A Llama config folder: all vLLM's scheduler config needs (no weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 128 * heads, "intermediate_size": 256,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": 32000,
        "max_position_embeddings": 4096, "torch_dtype": "float16"}))
    return path


def make_scheduler(spec, num_blocks: int, max_batched_tokens: int,
                   max_num_seqs: int, model_dir: Path, max_model_len=4096,
                   chunked_prefill: bool = True, prefix_caching: bool = False,
                   async_scheduling: bool | None = None):
    """vLLM's scheduler over ``spec``'s manager: its ``AsyncScheduler`` when
    the spec says async scheduling (vLLM's default), else ``Scheduler``."""
    from vllm.config import (CacheConfig, DeviceConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_sparsemm.engine.plugin import register
    register()  # the manager, and the patch that feeds its admission gate
    cache = CacheConfig(block_size=spec.block_size,
                        enable_prefix_caching=prefix_caching)
    cache.num_gpu_blocks = num_blocks
    config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir),
                                 max_model_len=max_model_len,
                                 skip_tokenizer_init=True, seed=0),
        cache_config=cache, device_config=DeviceConfig(device="cpu"),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_batched_tokens,
            max_model_len=max_model_len, is_encoder_decoder=False,
            enable_chunked_prefill=chunked_prefill))
    layers = [f"model.layers.{i}.self_attn.attn"
              for i in range(config.model_config.get_num_layers(
                  config.parallel_config))]
    kv_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    if async_scheduling is None:
        async_scheduling = getattr(spec, "async_scheduling", False)
    scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
    return scheduler_cls(config, kv_config, StructuredOutputManager(config),
                         block_size=spec.block_size)


def simulate(scheduler, num_requests: int, prompt_len: int, output_len: int,
             cost: CostModel = CostModel(), max_steps: int = 100_000,
             requests=None, clients: int | None = None,
             first_seconds: float | None = None) -> dict:
    """Submit a burst of requests, step until all finish, return the tally.

    ``requests`` (vLLM ``Request``s) replaces the ``num_requests`` identical
    ones; with ``clients``, that many are in flight at a time, each finished
    one replaced by the next (a closed loop of clients, as a chat server
    sees). Under an ``AsyncScheduler`` a step's output is processed after
    the next step is scheduled, as vLLM's engine does with async
    scheduling. A request with a ``stop_after`` attribute samples
    ``STOP_TOKEN`` as its output of that number (``chat_requests``'
    ``stop_at``). Time to first token is modelled: from the step a request
    was added after to the end of the step that sampled its first token.
    With ``first_seconds``, it also tallies the prompt and output tokens of
    the steps that end within that many modelled seconds, to set beside a
    load that `serve_matrix.py --max-seconds` cut."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    preempted, wasted = [0], [0]
    preempt = scheduler._preempt_request

    def counting_preempt(request, timestamp):
        preempted[0] += 1
        wasted[0] += request.num_computed_tokens  # recomputed later
        return preempt(request, timestamp)

    scheduler._preempt_request = counting_preempt
    if requests is None:
        requests = (Request(str(i), [5] * prompt_len, SamplingParams(
            max_tokens=output_len, ignore_eos=True), None)
            for i in range(num_requests))
    requests = iter(requests)
    arrived, first_token = {}, {}  # modelled seconds, per request
    sampled_count: dict[str, int] = {}

    cached = queried = 0  # first schedules' prefix-cache hits, prompt tokens

    def add(request, now):
        arrived[request.request_id] = now
        scheduler.add_request(request)

    for request in (requests if clients is None else
                    itertools.islice(requests, clients)):
        add(request, 0.0)
    waiting = 0  # requests waiting, summed over steps
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    seconds, steps, produced, peak = 0.0, 0, 0, 0
    early_prompt = early_output = 0  # within first_seconds
    host = 0.0  # wall seconds in vLLM's scheduler (this CPU, not the model)
    in_flight = isinstance(scheduler, AsyncScheduler)
    pending = None  # the step whose output is not processed yet
    while scheduler.get_num_unfinished_requests() and steps < max_steps:
        started = time.perf_counter()
        out = scheduler.schedule()
        host += time.perf_counter() - started
        for new in out.scheduled_new_reqs:
            cached += new.num_computed_tokens
            queried += scheduler.requests[new.req_id].num_prompt_tokens
        ids = list(out.num_scheduled_tokens)
        prefill = decode_rows = decode_blocks = begun = 0
        sampled = []
        for rid in ids:
            request, n = scheduler.requests[rid], out.num_scheduled_tokens[rid]
            if request.num_computed_tokens - n < request.num_prompt_tokens:
                prefill += n
                begun += request.num_computed_tokens == n
            else:  # released entries are null blocks: count real ones
                decode_rows += n
                decode_blocks += sum(not b.is_null
                                     for b in manager.req_to_blocks[rid])
            done_prefill = request.num_computed_tokens >= request.num_tokens
            sampled.append(_sample(request, sampled_count)
                           if done_prefill else [])
        seconds += cost.step(prefill, decode_rows, decode_blocks, begun)
        for rid, tokens in zip(ids, sampled):
            if tokens:
                first_token.setdefault(rid, seconds)
        output = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled)
        if in_flight:
            pending, (out, output) = (out, output), pending or (None, None)
        started = time.perf_counter()
        if out is not None:
            finished = sum(o.finished for outs in scheduler.update_from_output(
                out, output).values() for o in outs.outputs)
            for request in itertools.islice(requests, finished
                                            if clients else 0):
                add(request, seconds)
        host += time.perf_counter() - started
        emitted = sum(map(len, sampled))
        produced += emitted
        if first_seconds is not None and seconds <= first_seconds:
            early_prompt += prefill
            early_output += emitted
        steps += 1
        peak = max(peak, len(scheduler.running))
        waiting += len(scheduler.waiting)
    ttft = [first_token[rid] - arrived[rid] for rid in first_token]
    return {"steps": steps, "seconds": seconds,
            "output_tok_per_s": produced / seconds if seconds else 0.0,
            "finished": scheduler.get_num_unfinished_requests() == 0,
            "preemptions": preempted[0], "recomputed_tokens": wasted[0],
            "peak_running": peak, "mean_waiting": waiting / max(steps, 1),
            "scheduler_ms_per_step": 1e3 * host / max(steps, 1),
            "ttft_mean_s": float(np.mean(ttft)) if ttft else 0.0,
            "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft else 0.0,
            # prompt tokens that first schedules found in the prefix cache
            "prefix_hit_rate": cached / queried if queried else 0.0,
            "first_seconds_tokens": (early_prompt, early_output)}


STOP_TOKEN = 2  # what a request with ``stop_after`` samples last


def _sample(request, counts: dict[str, int]) -> list[int]:
    """The token a request samples this step: ``STOP_TOKEN`` as its
    ``stop_after``-th output (an answer ending at EOS), else 7. Counted per
    step it is scheduled, as under async scheduling the step after its
    last may already be under way (vLLM drops that token)."""
    count = counts[request.request_id] = counts.get(request.request_id, 0) + 1
    return [STOP_TOKEN if count == getattr(request, "stop_after", 0) else 7]


@functools.cache
@functools.cache
def block_hasher(block_size: int):
    """vLLM's request block hasher, made (and vLLM's hash seed set) once per
    block size, so requests made at different times hash equal prefixes
    alike."""
    import hashlib
    import pickle

    from vllm.v1.core.kv_cache_utils import (get_request_block_hasher,
                                             init_none_hash)

    def digest(value):
        return hashlib.sha256(pickle.dumps(value)).digest()

    init_none_hash(digest)
    return get_request_block_hasher(block_size, digest)


def chat_requests(num_requests: int, images: int, image_len: int,
                  question_len: tuple[int, int], output_len: int,
                  seed: int = 0, stop_at: tuple[int, int] | None = None,
                  max_model_len: int = 4096):
    """Requests about a few shared images (token runs standing for them),
    each with a question of its own: prefix-cache hits for all but an
    image's first request. Their blocks are hashed as vLLM hashes them.

    Each runs to ``output_len`` tokens (``max_tokens``, EOS ignored), or
    with ``stop_at=(lo, hi)`` as a chat client sends it: ``max_tokens``
    unset (vLLM's default, up to ``max_model_len``) and an answer that
    stops at EOS after ``lo`` to ``hi - 1`` tokens."""
    rng = np.random.default_rng(seed)
    for i in range(num_requests):
        image = int(rng.integers(images))
        question = rng.integers(100, 30_000, int(rng.integers(*question_len)))
        tokens = ([40_000 + image * image_len + j for j in range(image_len)]
                  + [int(t) for t in question])
        yield chat_request(str(i), tokens, output_len, rng, stop_at,
                           max_model_len)


def chat_request(request_id: str, tokens: list[int], output_len: int, rng,
                 stop_at: tuple[int, int] | None, max_model_len: int):
    """A chat load's request: ``output_len`` tokens with EOS ignored, or
    with ``stop_at`` ``max_tokens`` unset and an answer of ``lo`` to
    ``hi - 1`` tokens (its ``stop_after``, drawn from ``rng``)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    if stop_at is None:
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    else:
        params = SamplingParams(max_tokens=max_model_len - len(tokens),
                                stop_token_ids=[STOP_TOKEN])
    request = Request(request_id, tokens, params, None,
                      block_hasher=block_hasher(16))
    if stop_at is not None:
        request.stop_after = int(rng.integers(*stop_at))
    return request


class Conversations:
    """Chat clients each in a conversation about an image of its own, for
    ``simulate``'s closed loop (which asks for one request per finished
    one): a turn's prompt is the previous turn's prompt, its answer and a
    new question, sent once the previous turn finished; a conversation
    that ended makes room for a new one. Requests as ``chat_request`` makes them."""

    def __init__(self, conversations: int, turns: int, image_len: int,
                 question_len: tuple[int, int], output_len: int,
                 seed: int = 0, stop_at: tuple[int, int] | None = None,
                 max_model_len: int = 4096):
        self.rng = np.random.default_rng(seed)
        self.turns, self.image_len = turns, image_len
        self.question_len, self.output_len = question_len, output_len
        self.stop_at, self.max_model_len = stop_at, max_model_len
        self.new = iter(range(conversations))  # not begun yet
        self.last: dict[int, tuple[object, int]] = {}  # (request, turn)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        for conversation, (request, turn) in list(self.last.items()):
            if request.is_finished():
                del self.last[conversation]
                if turn + 1 < self.turns:
                    return self._turn(conversation, turn + 1,
                                      list(request.all_token_ids))
        conversation = next(self.new)  # StopIteration: all begun
        image = [60_000 + conversation * self.image_len + j
                 for j in range(self.image_len)]
        return self._turn(conversation, 0, image)

    def _turn(self, conversation: int, turn: int, history: list[int]):
        question = self.rng.integers(100, 30_000, int(
            self.rng.integers(*self.question_len)))
        request = chat_request(f"c{conversation}t{turn}",
                               history + [int(t) for t in question],
                               self.output_len, self.rng, self.stop_at,
                               self.max_model_len)
        self.last[conversation] = (request, turn)
        return request


def without_prefill_transient(scheduler) -> None:
    """Make sparsemm's manager hold a compressed request's compacted blocks
    from its first step on (see the module docstring). Only meaningful with
    chunked prefill off: a prompt then always completes in one step."""
    from vllm_sparsemm.core.pages import cdiv
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    law, bs = manager.law, manager.block_size

    def blocks(prompt_len: int, tokens: int) -> int:
        if not law.compresses(prompt_len):
            return cdiv(max(tokens, prompt_len), bs)
        return law.compacted_blocks(prompt_len, max(tokens - prompt_len, 0))

    def slot_tokens(request_id, num_tokens):
        tracked = manager._requests.get(request_id)
        if tracked is None or not law.compresses(tracked.prompt_len):
            return num_tokens
        return blocks(tracked.prompt_len, num_tokens) * bs

    running_row, candidate_row = manager._running_row, manager._candidate_row
    manager._slot_tokens = slot_tokens
    manager.remove_skipped_blocks = lambda *args, **kwargs: None
    manager._held_blocks = lambda rid: len(manager.req_to_blocks.get(rid, ()))
    # the gate's rows: no request ever holds its whole prompt
    manager._running_row = lambda rid, tracked: running_row(
        rid, tracked)._replace(whole=0, release=0)
    manager._candidate_row = lambda rid, num_tokens: candidate_row(
        rid, num_tokens)._replace(whole=0, release=0)


def sparsemm_spec(budget: int, admission_reserve: int, scores: torch.Tensor,
                  block_size: int = 16, head_size: int = 128,
                  admission_pacing: bool = True,
                  async_scheduling: bool = False):
    from vllm_sparsemm.core.budget import BudgetPlan
    from vllm_sparsemm.engine.config import SparseMMSettings
    from vllm_sparsemm.engine.kv_spec import SparseMMSpec
    kv_heads = scores.shape[1]
    plan = BudgetPlan.build(SparseMMSettings(budget=budget), scores, kv_heads)
    return SparseMMSpec(block_size=block_size, num_kv_heads=kv_heads,
                        head_size=head_size, dtype=torch.float16, plan=plan,
                        admission_reserve=admission_reserve,
                        admission_pacing=admission_pacing,
                        async_scheduling=async_scheduling)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="256,64",
                        help="sparsemm budgets, a comma list")
    parser.add_argument("--admission-reserve", default="256",
                        help="sparsemm admission_reserve values, a comma list")
    parser.add_argument("--admission-pacing", default="on,off",
                        help="sparsemm admission_pacing values, a comma list "
                        "of on/off")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=2900)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--kv-blocks", type=int, default=7230,
                        help="KV blocks of 16 tokens (7,230: a full H100 for "
                        "a 7B model)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--no-prefill-transient", action="store_true",
                        help="also model sparsemm with prompts written "
                        "straight into compressed pages (not implemented "
                        "in the plugin; see the module docstring)")
    parser.add_argument("--weights-ms", type=float, default=4.5,
                        help="matmul floor per step (weights read once)")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="per-step cost besides matmuls and attention")
    parser.add_argument("--prompt-ms", type=float, default=0.0,
                        help="per prompt begun: its image through the vision "
                        "tower (docs/benchmarks.md gives fitted values)")
    parser.add_argument("--kv-tb-per-s", type=float, default=2.4,
                        help="bandwidth of decode attention over the KV, "
                        "TB/s (2.4: FlashAttention on an H100). An H200 "
                        "reads 1.43x faster: --weights-ms 3.64 "
                        "--kv-tb-per-s 3.43 with the fitted --step-ms and "
                        "--prompt-ms (docs/benchmarks.md)")
    parser.add_argument("--chat-images", type=int, default=0,
                        help="instead of one burst of identical prompts: "
                        "--requests questions about this many shared images "
                        "of --prompt-len tokens (10-29 question tokens "
                        "each), prefix caching on (chat_requests)")
    parser.add_argument("--answers-stop", default=None, metavar="LO,HI",
                        help="with --chat-images or --conversations: "
                        "requests as chat clients "
                        "send them, max_tokens unset (up to max_model_len) "
                        "and answers that stop at EOS after LO to HI-1 "
                        "tokens (instead of --output-len, EOS ignored)")
    parser.add_argument("--conversations", type=int, default=0,
                        help="instead: this many conversations of --turns "
                        "turns about an image of --prompt-len tokens each, "
                        "every turn sending the history and the previous "
                        "answer, prefix caching on (Conversations); "
                        "--clients of them at a time")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--clients", type=int, default=None,
                        help="requests in flight at a time, each finished "
                        "one replaced by the next (default: all at once)")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="vLLM's AsyncScheduler, as `vllm serve` runs "
                        "by default (outputs processed a step late)")
    parser.add_argument("--first-seconds", type=float, default=None,
                        help="also report the prompt and output tokens of "
                        "the first this many modelled seconds (as a load cut "
                        "by serve_matrix.py --max-seconds counts them)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per case; the scheduler time reported is "
                        "the least (the run this shared CPU disturbed least)")
    parser.add_argument("--head-scores", default=str(
        ROOT / "head_scores" / "llava-v1.6-vicuna-7b.json"))
    args = parser.parse_args()

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_sparsemm.core.scores import load_head_scores
    scores = load_head_scores(args.head_scores)
    model_dir = write_text_model(Path(tempfile.mkdtemp()) / "model",
                                 *scores.shape)
    cases = [("stock", FullAttentionSpec(
        block_size=16, num_kv_heads=scores.shape[1], head_size=128,
        dtype=torch.float16))]
    cases += [(f"sparsemm B={b} reserve={r} pacing={p}{suffix}",
               sparsemm_spec(int(b), int(r), scores,
                             admission_pacing=p == "on",
                             async_scheduling=args.async_scheduling))
              for suffix in ([""] + [" no-transient"] *
                             args.no_prefill_transient)
              for b in args.budget.split(",")
              for r in args.admission_reserve.split(",")
              for p in args.admission_pacing.split(",")]
    stop_at = (tuple(int(v) for v in args.answers_stop.split(","))
               if args.answers_stop else None)
    print("case | steps | model s | out tok/s | x stock | preemptions | "
          "recomputed tokens | peak running | TTFT mean / p99 model ms | "
          "prefix hit | scheduler ms/step (this CPU)" +
          (f" | prompt / output tokens in {args.first_seconds:g} s"
           if args.first_seconds is not None else ""))
    cost = CostModel(weights_s=args.weights_ms / 1e3,
                     step_s=args.step_ms / 1e3,
                     prompt_s=args.prompt_ms / 1e3,
                     kv_bytes_per_s=args.kv_tb_per_s * 1e12)
    base = None
    for name, spec in cases:
        no_transient = name.endswith("no-transient")
        runs = []
        for _ in range(args.repeat):
            scheduler = make_scheduler(
                spec, args.kv_blocks, args.max_num_batched_tokens,
                args.max_num_seqs, model_dir,
                chunked_prefill=not no_transient,
                prefix_caching=args.chat_images > 0 or args.conversations > 0,
                async_scheduling=args.async_scheduling)
            if no_transient:
                without_prefill_transient(scheduler)
            requests = (chat_requests(args.requests, args.chat_images,
                                      args.prompt_len, (10, 30),
                                      args.output_len, stop_at=stop_at)
                        if args.chat_images else None)
            if args.conversations:
                requests = Conversations(args.conversations, args.turns,
                                         args.prompt_len, (10, 30),
                                         args.output_len, stop_at=stop_at)
            runs.append(simulate(
                scheduler, args.requests, args.prompt_len, args.output_len,
                cost, requests=requests, clients=args.clients,
                first_seconds=args.first_seconds))
        r = dict(runs[0], scheduler_ms_per_step=min(
            run["scheduler_ms_per_step"] for run in runs))
        base = base or r["output_tok_per_s"]
        print(f"{name} | {r['steps']} | {r['seconds']:.1f} | "
              f"{r['output_tok_per_s']:.0f} | "
              f"{r['output_tok_per_s'] / base:.2f} | {r['preemptions']} | "
              f"{r['recomputed_tokens']} | {r['peak_running']} | "
              f"{1e3 * r['ttft_mean_s']:.0f} / {1e3 * r['ttft_p99_s']:.0f} | "
              f"{r['prefix_hit_rate']:.1%} | "
              f"{r['scheduler_ms_per_step']:.2f}" +
              (" | {:,} / {:,}".format(*r["first_seconds_tokens"])
               if args.first_seconds is not None else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
