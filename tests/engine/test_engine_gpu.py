"""The real vLLM engine with the sparsemm backend, on tiny random models saved locally.

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the tests
can read the scheduler's block pool and the worker's selections. Most runs use
``enforce_eager`` to keep start-up short; two run vLLM's compile mode, with
piecewise CUDA graphs only and with full decode graphs (the default).
"""

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

MAX_TOKENS = 24
# top-two logit gap under which fp8 rounding may flip a greedy token
FP8_MARGIN = 0.1
# fp8 KV engines run bf16 models: FlashAttention 3 writes an fp8 product
# in bf16 (some of its builds in nothing else)
FP8_ENGINE = {"kv_cache_dtype": "fp8", "dtype": "bfloat16"}
TINY = dict(num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from vllm_sparsemm.testing.checkpoints import (save_tiny_internvl,
                                                   save_tiny_llava,
                                                   save_tiny_llava_next,
                                                   save_tiny_llava_onevision,
                                                   save_tiny_qwen2_vl)
    root = tmp_path_factory.mktemp("models")
    return {
        "llava": str(save_tiny_llava(root / "llava", seed=1, num_layers=4,
                                     num_heads=4, num_kv_heads=4, head_dim=64,
                                     image_size=336)),
        "llava-small": str(save_tiny_llava(root / "llava-small", seed=1,
                                           num_layers=4, num_heads=4,
                                           num_kv_heads=4, head_dim=64,
                                           image_size=112)),
        "llava-next": str(save_tiny_llava_next(root / "llava-next", seed=1,
                                               **TINY)),
        "qwen2-vl": str(save_tiny_qwen2_vl(root / "qwen", seed=1, num_layers=4,
                                           num_heads=4, num_kv_heads=2,
                                           head_dim=64)),
        "qwen2.5-vl": str(save_tiny_qwen2_vl(root / "qwen2.5", seed=1,
                                             version="2.5", num_layers=4,
                                             num_heads=4, num_kv_heads=2,
                                             head_dim=64)),
        "qwen3-vl": str(save_tiny_qwen2_vl(root / "qwen3", seed=1,
                                           version="3", num_layers=4,
                                           num_heads=4, num_kv_heads=2,
                                           head_dim=64)),
        "llava-onevision": str(save_tiny_llava_onevision(
            root / "llava-onevision", seed=1, **dict(TINY, num_kv_heads=2))),
        "llava-next-mistral": str(save_tiny_llava_next(
            root / "llava-next-mistral", seed=1, text_model="mistral",
            **dict(TINY, num_kv_heads=2))),
        "internvl": str(save_tiny_internvl(root / "internvl", seed=1,
                                           **dict(TINY, num_kv_heads=2))),
    }


def _image(seed, size):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(
        np.uint8))


def _video(seed, frames=4, size=(112, 84)):
    """``frames`` random RGB frames ``[T, H, W, 3]`` (uint8)."""
    rng = np.random.default_rng(seed)
    return (rng.random((frames, size[1], size[0], 3)) * 255).astype(np.uint8)


def _video_metadata(frames: int, fps: float = 2.0) -> dict:
    """What vLLM's video loaders attach to decoded frames."""
    return {"total_num_frames": frames, "fps": fps, "duration": frames / fps,
            "video_backend": "opencv", "frames_indices": list(range(frames)),
            "do_sample_frames": False}


def _prompts(kind, n, seed=0, text_len=40, video=False):
    """n requests: images of varying size, some text-only; with ``video``
    (Qwen VL and LLaVA-OneVision), request i % 4 == 1 asks about a short
    video and i % 4 == 2 about an image and a video."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = "".join(rng.choice(list("abcdefghij klmnop"), text_len + 7 * i))
        with_image = i % 4 != 3 and not (video and i % 4 == 1)
        with_video = video and i % 4 in (1, 2)
        if kind.startswith("llava"):
            media = ("<image>" if with_image else "") + (
                "<video>" if with_video else "")
            prompt = f"USER: {media}\n{text} ASSISTANT:"
        elif kind == "internvl":
            media = "<IMG_CONTEXT>\n" if with_image else ""
            prompt = (f"<|im_start|>user\n{media}{text}<|im_end|>\n"
                      f"<|im_start|>assistant\n")
        else:
            media = ("<|vision_start|><|image_pad|><|vision_end|>"
                     if with_image else "") + (
                "<|vision_start|><|video_pad|><|vision_end|>"
                if with_video else "")
            prompt = (f"<|im_start|>user\n{media}{text}<|im_end|>\n"
                      f"<|im_start|>assistant\n")
        request = {"prompt": prompt}
        data = {}
        if with_image:
            data["image"] = _image(seed * 100 + i, (224 + 28 * (i % 3), 196))
        if with_video:
            frames = _video(seed * 100 + i)
            # vLLM's Qwen3-VL wants the frames' metadata (their timestamps)
            data["video"] = (frames, _video_metadata(len(frames))) \
                if kind.startswith("qwen3") else frames
        if data:
            request["multi_modal_data"] = data
        out.append(request)
    return out


def _llm(model, backend, budget=None, **kwargs):
    from vllm import LLM
    # a fixed KV pool (no sizing from a memory profile, which engines of
    # other tests on the same GPU would disturb: tests/gpu/run_all.sh JOBS)
    args = dict(model=model, dtype="float16", max_model_len=2048,
                gpu_memory_utilization=0.05, kv_cache_memory_bytes=1 << 30,
                enforce_eager=True, seed=0,
                limit_mm_per_prompt={"image": 1, "video": 1},
                max_num_seqs=64,
                enable_prefix_caching=False)
    args.update(kwargs)
    if backend == "sparsemm":
        config = {"head_scores": "uniform", "window": 8}
        config.update(budget or {})
        args.update(attention_backend="sparsemm",
                    additional_config={"sparsemm": config})
    else:
        args.update(attention_backend="FLASH_ATTN")
    return LLM(**args)


def _generate(llm, prompts, max_tokens=MAX_TOKENS, logprobs=False):
    """Greedy tokens and prompt lengths; with ``logprobs`` also each
    generated token's log-probability (tiny random models often repeat one
    token: equal tokens alone would miss a small change in attention), or
    with ``logprobs="margins"`` each step's gap between its two likeliest
    tokens (equal to the gap of their logits)."""
    from vllm import SamplingParams
    top = {False: None, True: 0, "margins": 2}[logprobs]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                            ignore_eos=True, logprobs=top)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    lens = [len(o.prompt_token_ids) for o in outputs]
    if not logprobs:
        return tokens, lens
    if logprobs == "margins":
        return tokens, lens, [[_top_two_gap(step)
                               for step in o.outputs[0].logprobs]
                              for o in outputs]
    return tokens, lens, [
        [step[token].logprob for step, token in zip(o.outputs[0].logprobs,
                                                     o.outputs[0].token_ids)]
        for o in outputs]


def _top_two_gap(step) -> float:
    """The log-probability gap between a step's ranks 1 and 2."""
    by_rank = {entry.rank: entry.logprob for entry in step.values()}
    return by_rank[1] - by_rank[2]


def _tokens(model, backend, budget=None, prompts=None, max_tokens=MAX_TOKENS,
            **kwargs):
    """Greedy tokens from an engine in a fresh process (engines leak GPU
    memory when several start in one process). ``prompts``: _prompts args
    plus ``pick``, the indices to send."""
    args = json.dumps([model, backend, budget, prompts, max_tokens, kwargs])
    code = ("import json, sys; sys.path.insert(0, 'tests/engine'); sys.path.insert(0, 'tests'); "
            "import test_engine_gpu as t; "
            "print('RESULT' + json.dumps(t._child(*json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, args],
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
    assert lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT"):])


def _conversation(kind, seed=11):
    """Prompts that share prefixes, sent one after another: a question about
    an image, the same again, another question about that image, the first
    one's second turn (its answer, then a new question), a third turn, and
    a text-only prompt."""
    image = _image(seed, (224, 196))
    first = "describe every object you can see here in detail " * 3
    turns = [first, first, "what colours dominate the left half " * 3,
             first + "ASSISTANT: a cat on a mat USER: and the right half?",
             first + "ASSISTANT: a cat on a mat USER: and the right half? "
             "ASSISTANT: a dog USER: count the animals"]
    out = []
    for text in turns:
        if kind.startswith("llava"):
            prompt = f"USER: <image>\n{text} ASSISTANT:"
        else:
            prompt = (f"<|im_start|>user\n<|vision_start|><|image_pad|>"
                      f"<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
        out.append({"prompt": prompt, "multi_modal_data": {"image": image}})
    out.append({"prompt": "USER: " + first * 2 + " ASSISTANT:"
                if kind.startswith("llava") else first * 2})
    return out


def _short_questions():
    """Three images asked about in turn, twice, by the same one-letter
    question: the second round's prompts are whole-prompt hits, and
    sparsemm's observation window, recomputed, reaches into the image
    (stock's hit, one token short, would not)."""
    images = [_image(seed, (224, 196)) for seed in (21, 22, 23)]
    return [{"prompt": "USER: <image>\na ASSISTANT:",
             "multi_modal_data": {"image": image}}
            for _ in range(2) for image in images]


def _count_encoder_runs():
    """Encoder inputs the in-process runner computes from now on."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    runs, execute = [0], GPUModelRunner._execute_mm_encoder

    def counting(self, scheduler_output, *args, **kw):
        runs[0] += sum(map(len, scheduler_output.scheduled_encoder_inputs.
                           values()))
        return execute(self, scheduler_output, *args, **kw)

    GPUModelRunner._execute_mm_encoder = counting
    return runs


def _child(model, backend, budget, prompts, max_tokens, kwargs):
    sequential = kwargs.pop("sequential", False)
    encoder_runs = kwargs.pop("count_encoder_runs", False)
    if "conversation" in prompts:
        chosen = _conversation(prompts["conversation"])
    elif "short_questions" in prompts:
        chosen = _short_questions()
    else:
        pick = prompts.pop("pick", None)
        chosen = _prompts(**prompts)
        if pick is not None:
            chosen = [chosen[i] for i in pick]
    count = kwargs.pop("count_layer0_calls", False)
    logprobs = kwargs.pop("logprobs", False)
    guard = kwargs.pop("guard_syncs", False)
    llm = _llm(model, backend, budget, **kwargs)
    if guard:
        syncs, guarded = _guard_syncs()
        tokens, lens = _generate(llm, chosen, max_tokens)
        return tokens, lens, syncs, guarded[0]
    runs = _count_encoder_runs() if encoder_runs else None
    if sequential:  # each request finishes before the next: cache hits
        from vllm import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                ignore_eos=True)
        outputs = [llm.generate([prompt], params, use_tqdm=False)[0]
                   for prompt in chosen]
        return ([list(o.outputs[0].token_ids) for o in outputs],
                [len(o.prompt_token_ids) for o in outputs],
                sum(o.num_cached_tokens or 0 for o in outputs)) + (
                    (runs[0], ) if runs else ())
    if not count:
        return _generate(llm, chosen, max_tokens, logprobs)
    from vllm_sparsemm.engine.backend import SparseMMImpl
    calls, forward = [0], SparseMMImpl.forward

    def counting(self, layer, *args, **kw):  # Python runs only outside FULL graphs
        calls[0] += ".layers.0." in layer.layer_name
        return forward(self, layer, *args, **kw)

    SparseMMImpl.forward = counting
    tokens, lens = _generate(llm, chosen, max_tokens)
    return tokens, lens, calls[0]


def _guard_syncs():
    """Run sparsemm's per-step code, the builder's step plan and every
    layer's forward, under torch's sync debug mode: each operation there
    that makes the host wait for the device (``.item()``, a blocking copy,
    a data-dependent shape) is recorded as ``file:line`` of the innermost
    caller outside torch. The host must never wait in a step: vLLM prepares
    the next step while the device runs this one, and a wait there costs
    every request that step's host time. Graph captures are left alone."""
    import traceback
    import warnings

    from vllm_sparsemm.engine import backend
    syncs, guarded = [], [0]

    def record(message, *args, **kwargs):
        if "synchroniz" not in str(message):
            return
        for frame in reversed(traceback.extract_stack()[:-1]):
            if ("/torch/" not in frame.filename
                    and "warnings" not in frame.filename):
                syncs.append(f"{frame.filename}:{frame.lineno} "
                             f"({frame.name})")
                return

    def checked(function):
        def run(*args, **kwargs):
            if torch.cuda.is_current_stream_capturing():
                return function(*args, **kwargs)
            guarded[0] += 1
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return function(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

        return run

    backend.step_plan = checked(backend.step_plan)
    backend.SparseMMImpl.forward = checked(backend.SparseMMImpl.forward)
    return syncs, guarded


def _close(llm):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    torch.cuda.empty_cache()


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _worker_state(llm):
    """The in-process engine's sparsemm worker state (its builder's)."""
    from vllm_sparsemm.engine.patches import sparsemm_builders
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    runner = executor.driver_worker.worker.model_runner
    return sparsemm_builders(runner)[0].state


@pytest.mark.parametrize("kind", ["llava", "llava-next", "qwen2-vl",
                                  "qwen2.5-vl", "qwen3-vl",
                                  "llava-next-mistral", "llava-onevision",
                                  "internvl"])
def test_no_eviction_is_token_identical_to_flash_attn(models, kind):
    spec = dict(kind=kind, n=8)
    want, lens, want_logprobs = _tokens(models[kind], "FLASH_ATTN", None,
                                        dict(spec), logprobs=True)
    got, _, got_logprobs = _tokens(models[kind], "sparsemm", {"budget": 4096},
                                   dict(spec), logprobs=True)
    assert max(lens) < 4096
    assert got == want
    _assert_same_logprobs(got_logprobs, want_logprobs)


def _assert_same_logprobs(got, want):
    """Each generated token's log-probability as stock's: uncompressed
    requests take stock's FlashAttention path; the runners may order fp16
    sums differently (sparsemm runs vLLM's V1 runner), nothing more."""
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-2)


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_fp8_cache_without_eviction_gives_stocks_tokens(models, kind):
    """``--kv-cache-dtype fp8`` for both: with B above every prompt, the
    tokens of stock FlashAttention over its fp8 cache."""
    spec = dict(kind=kind, n=8)
    want, lens, want_logprobs = _tokens(models[kind], "FLASH_ATTN", None,
                                        dict(spec), logprobs=True,
                                        **FP8_ENGINE)
    got, _, got_logprobs = _tokens(models[kind], "sparsemm", {"budget": 4096},
                                   dict(spec), logprobs=True, **FP8_ENGINE)
    assert max(lens) < 4096
    assert got == want
    _assert_same_logprobs(got_logprobs, want_logprobs)


def test_fp8_decode_kernels_agree(models):
    """Over an fp8 cache with eviction, the Triton decode kernel (16-bit
    products of widened fp8, as in ``test_fp8_kernels_on_gpu``) against
    FlashAttention 3's fp8 path, which also rounds the softmax weights to
    fp8: both match their references at kernel level, so here their tokens
    must agree up to the first step where either run's two likeliest
    tokens are within ``FP8_MARGIN`` (as the fp8 oracle test); some step
    must be compared."""
    spec = dict(kind="llava-small", n=6, seed=9, text_len=100)
    budget = {"budget": 48, "window": 16}
    want, _, want_gaps = _tokens(models["llava-small"], "sparsemm",
                                 {**budget, "decode_kernel": "flash_attn"},
                                 dict(spec), logprobs="margins", **FP8_ENGINE)
    got, _, got_gaps = _tokens(models["llava-small"], "sparsemm",
                               {**budget, "decode_kernel": "triton"},
                               dict(spec), logprobs="margins", **FP8_ENGINE,
                               enforce_eager=False)
    compared = 0
    for a, b, gaps_a, gaps_b in zip(want, got, want_gaps, got_gaps):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                    len(a))
        close = next((i for i, gap in enumerate(map(min, gaps_a, gaps_b))
                      if gap < FP8_MARGIN), len(a))
        print(f"fp8 decode: tokens agree for {same}; first low-margin "
              f"step {close}")
        assert same >= close, (a, b, gaps_a, gaps_b)
        compared += close
    assert compared > 0


VIDEO_KINDS = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision"]


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_prompts_without_eviction_give_stocks_tokens(models, kind):
    """Video prompts, alone and beside an image, with B above every prompt:
    stock's tokens."""
    spec = dict(kind=kind, n=8, video=True)
    want, lens = _tokens(models[kind], "FLASH_ATTN", None, dict(spec))
    got, _ = _tokens(models[kind], "sparsemm", {"budget": 4096}, dict(spec))
    assert max(lens) < 4096
    assert got == want


def test_video_and_image_prompt_same_alone_and_in_chunks(models):
    """A prompt with an image and a video, compressed, gives the same tokens
    alone as in a batch under chunked prefill (its window may span
    chunks)."""
    kind = "qwen2-vl"
    spec = dict(kind=kind, n=8, seed=5, text_len=60, video=True)
    budget = {"budget": 48, "window": 16}
    alone, lens = _tokens(models[kind], "sparsemm", budget,
                          dict(spec, pick=[2]))
    assert lens[0] > 48
    for chunk in (64, 2048):
        chunked, _ = _tokens(models[kind], "sparsemm", budget, dict(spec),
                             max_num_batched_tokens=chunk,
                             enable_chunked_prefill=True)
        assert chunked[2] == alone[0], f"chunk {chunk}"


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen3-vl"])
def test_video_pruning_and_sparsemm_together(models, kind):
    """vLLM's video-token pruning (EVS, ``--video-pruning-rate``) drops
    video tokens before the language model; sparsemm then budgets what is
    left. With B above every prompt, stock's tokens under the same
    pruning; compressed, a video prompt gives the same tokens alone as in a
    chunked batch."""
    spec = dict(kind=kind, n=8, seed=5, text_len=60, video=True)
    pruned = dict(video_pruning_rate=0.5)
    want, lens = _tokens(models[kind], "FLASH_ATTN", None, dict(spec),
                         **pruned)
    got, _ = _tokens(models[kind], "sparsemm", {"budget": 4096}, dict(spec),
                     **pruned)
    assert got == want
    budget = {"budget": 48, "window": 16}
    alone, alone_lens = _tokens(models[kind], "sparsemm", budget,
                                dict(spec, pick=[2]), **pruned)
    assert alone_lens[0] == lens[2] > 48
    chunked, _ = _tokens(models[kind], "sparsemm", budget, dict(spec),
                         max_num_batched_tokens=64,
                         enable_chunked_prefill=True, **pruned)
    assert chunked[2] == alone[0]


def _set_kv_scales(llm, state) -> torch.Tensor:
    """Give every attention layer of the in-process engine fp8 scales
    ``(k, v, q)`` unlike 1 and unlike each other's, as a checkpoint with
    scales would, and let the worker state read them again (it reads them
    once, at the first forward, which start-up has run). The tiny
    checkpoints have none: at scale 1 a missed scale would not show.
    Returns them ``[L, 3]`` for the oracle."""
    from vllm.model_executor.models.utils import extract_layer_index
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    runner = executor.driver_worker.worker.model_runner
    layers = runner.vllm_config.compilation_config.static_forward_context
    scales = torch.tensor([[0.5, 2.0, 0.25]]) * (
        1 + torch.arange(state.num_layers)[:, None] / 4)
    for name, layer in layers.items():
        if not hasattr(layer, "_k_scale"):
            continue
        row = scales[extract_layer_index(name)].tolist()
        for (tensor, number), value in zip(
                (("_k_scale", "_k_scale_float"), ("_v_scale", "_v_scale_float"),
                 ("_q_scale", "_q_scale_float")), row):
            getattr(layer, tensor).fill_(value)  # stock kernels read these
            setattr(layer, number, value)
    state._scales_adopted = [False] * state.num_layers
    return scales


@pytest.mark.parametrize("kind, budget", [("llava", 96), ("llava-next", 96),
                                          ("qwen2-vl", 48), ("qwen2.5-vl", 48),
                                          ("qwen3-vl", 48),
                                          ("llava-next-mistral", 96),
                                          ("llava-onevision", 96),
                                          ("internvl", 96),
                                          ("qwen2-vl-video", 48),
                                          ("llava-fp8", 96),
                                          ("qwen2-vl-fp8", 48)])
def test_eviction_matches_the_oracle(models, kind, budget):
    """Selections equal the reference on vLLM's own queries/keys (exact but
    for float32 rounding ties at a head's cut: ``_same_selection``), and
    the fp32 HF oracle's (near-exact: vLLM runs fp16); tokens agree >= 16.
    ``-fp8``: vLLM over an fp8 KV cache, the oracle on fp8-rounded
    queries, keys and values; tokens agree up to the oracle's first step
    whose top two logits are within ``FP8_MARGIN``."""
    from transformers import AutoProcessor

    from vllm_sparsemm.testing import tiny
    from vllm_sparsemm.testing.oracle import SparseMMOracle
    fp8 = kind.endswith("-fp8")
    kind = kind.removesuffix("-fp8")
    video = kind.endswith("-video")  # a video prompt of the same model
    kind = kind.removesuffix("-video")
    prompt = (_prompts(kind, 2, video=True)[1] if video else
              _prompts(kind, 1)[0])
    budget = {"budget": budget, "window": 16}
    llm = _llm(models[kind], "sparsemm", budget,
               **(FP8_ENGINE if fp8 else {}))
    state = _worker_state(llm)
    kv_scales = _set_kv_scales(llm, state) if fp8 else None
    state.recorded = {}
    tokens, lens = _generate(llm, [prompt])
    recorded = state.recorded
    law = state.law
    _close(llm)
    (req_id, layers), = recorded.items()
    swapped = sum(_same_selection(queries, keys, law.caps[layer], positions,
                                  counts, law.plan.pool_kernel)
                  for layer, (queries, keys, positions, counts)
                  in layers.items())

    processor = AutoProcessor.from_pretrained(models[kind])
    media = prompt["multi_modal_data"]
    inputs = processor(images=media.get("image"),
                       videos=[media["video"]] if video else None,
                       text=prompt["prompt"], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == lens[0]
    model = {"llava": lambda: tiny.tiny_llava(seed=1, image_size=336, **TINY),
             "llava-next": lambda: tiny.tiny_llava_next(seed=1, **TINY),
             "qwen2-vl": lambda: tiny.tiny_qwen2_vl(seed=1, **dict(
                 TINY, num_kv_heads=2)),
             "qwen2.5-vl": lambda: tiny.tiny_qwen2_5_vl(seed=1, **dict(
                 TINY, num_kv_heads=2)),
             "qwen3-vl": lambda: tiny.tiny_qwen3_vl(seed=1, **dict(
                 TINY, num_kv_heads=2)),
             "llava-onevision": lambda: tiny.tiny_llava_onevision(
                 seed=1, **dict(TINY, num_kv_heads=2)),
             "llava-next-mistral": lambda: tiny.tiny_llava_next(
                 seed=1, text_model="mistral", **dict(TINY, num_kv_heads=2)),
             "internvl": lambda: tiny.tiny_internvl(
                 seed=1, **dict(TINY, num_kv_heads=2)),
             }[kind]()
    oracle = SparseMMOracle(model, law.caps, budget["budget"],
                            budget["window"],
                            kv_dtype=torch.float8_e4m3fn if fp8 else None,
                            kv_scales=kv_scales)
    result = oracle.generate(dict(inputs), MAX_TOKENS)
    overlap = []
    for layer, (positions, counts) in enumerate(result.kept):
        vllm_pos = layers[layer][2]
        for h in range(positions.shape[0]):
            a = set(positions[h, :counts[h]].tolist())
            b = set(vllm_pos[h, :counts[h]].tolist())
            overlap.append(len(a & b) / len(a))
    print(f"oracle kept-position overlap: min {min(overlap):.4f} "
          f"mean {np.mean(overlap):.4f}; {swapped} kept keys swapped at a "
          f"rounding tie; tokens {tokens[0]} vs {result.tokens}")
    same = next((i for i, (a, b) in enumerate(zip(tokens[0], result.tokens))
                 if a != b), len(result.tokens))
    if fp8:
        # vLLM rounds fp16 activations to fp8, the oracle fp32 ones: a value
        # near the midpoint of two fp8 neighbours (6% apart) may round to
        # either, which moves scores near a head's cut and logits a little
        top2 = result.logits.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        close = next((i for i, m in enumerate(margins) if m < FP8_MARGIN),
                     len(margins))
        print(f"fp8: tokens agree for {same}; first low-margin step {close}")
        assert np.mean(overlap) >= 0.95
        assert same >= close, (tokens[0], result.tokens, margins)
        return
    assert np.mean(overlap) >= 0.98
    assert same >= 16, (tokens[0], result.tokens)


def _same_selection(queries, keys, caps, positions, counts, pool_kernel):
    """vLLM's selection of one layer against the reference on the same
    queries and keys. Counts must be equal. Positions too, except where the
    GPU's Triton scores (``triton_ops.window_means``, float32 sums in
    another order) put two keys at a rounding tie at a head's cut: a key
    kept by one side only must score within 1e-5 of the cut (relative to
    the head's best). Returns how many kept keys differ."""
    from vllm_sparsemm.core.selection import kept_positions, window_scores
    want_pos, want_counts = kept_positions(queries, keys, caps, pool_kernel)
    assert torch.equal(counts, want_counts)
    if torch.equal(positions, want_pos):
        return 0
    scores = window_scores(queries, keys, pool_kernel)  # [Hkv, N - W]
    window, swapped = queries.shape[0], 0
    for h, count in enumerate(counts.tolist()):
        got = set(positions[h, :count].tolist())
        diff = got ^ set(want_pos[h, :count].tolist())
        if not diff:
            continue
        head = scores[h]
        cut = head.sort(descending=True).values[count - window - 1]
        for key in diff:
            assert key < head.numel(), (h, key)  # window keys: always kept
            assert abs(head[key] - cut) <= 1e-5 * head.max(), (h, key)
        swapped += len(diff) // 2
    return swapped


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_prefix_caching_changes_no_token(models, kind):
    """Repeated prompts, shared images and later turns of a conversation,
    each sent after the last finished: greedy tokens with caching on equal
    caching off, and the cache was hit (the debug net poisons what nobody
    may read)."""
    budget = {"budget": 48, "window": 16, "debug_poison": True}
    spec = dict(conversation=kind)
    off, lens, _ = _tokens(models[kind], "sparsemm", budget, dict(spec),
                           sequential=True, enable_prefix_caching=False)
    on, _, hits = _tokens(models[kind], "sparsemm", budget, dict(spec),
                          sequential=True, enable_prefix_caching=True)
    assert min(lens[:5]) > 48  # compressed
    assert hits > 0
    assert on == off


def test_encoder_outputs_from_cpu_when_the_window_reaches_the_image(models):
    """A hit stops ``window`` tokens short of the prompt, inside the image
    when the question is short; with an encoder cache of one image, three
    images asked about again in turn each need the encoder again, unless
    their outputs come back from CPU memory (encoder_cpu_cache_gib).
    Tokens equal caching off either way; with the CPU cache each image is
    encoded once."""
    budget = {"budget": 48, "window": 16, "debug_poison": True}
    small = dict(sequential=True, max_num_batched_tokens=64, max_num_seqs=16)
    off, lens, _ = _tokens(models["llava"], "sparsemm", budget,
                           {"short_questions": True},
                           enable_prefix_caching=False, **small)
    assert min(lens) > 48  # compressed
    results = {}
    for gib in (0, 0.05):
        results[gib] = _tokens(
            models["llava"], "sparsemm",
            {**budget, "encoder_cpu_cache_gib": gib},
            {"short_questions": True}, enable_prefix_caching=True,
            count_encoder_runs=True, **small)
    for tokens, _, hits, _ in results.values():
        assert hits > 0 and tokens == off
    assert results[0][3] == 6  # every request: its window needs the image
    assert results[0.05][3] == 3  # once per image


def test_prefix_caching_without_eviction_gives_stocks_tokens(models):
    """B >= N with caching on for both: sparsemm is stock attention."""
    spec = dict(conversation="llava")
    want, lens, _ = _tokens(models["llava"], "FLASH_ATTN", None, dict(spec),
                            sequential=True, enable_prefix_caching=True)
    got, _, hits = _tokens(models["llava"], "sparsemm", {"budget": 4096},
                           dict(spec), sequential=True,
                           enable_prefix_caching=True)
    assert max(lens) < 4096 and hits > 0
    assert got == want


def test_same_output_alone_in_a_batch_and_chunked(models):
    kind = "llava-small"
    spec = dict(kind=kind, n=32, seed=5, text_len=120)
    budget = {"budget": 48, "window": 16}
    alone, lens = _tokens(models[kind], "sparsemm", budget, dict(spec, pick=[0]))
    batch, _ = _tokens(models[kind], "sparsemm", budget, dict(spec))
    assert lens[0] > 48  # compressed
    assert batch[0] == alone[0]
    for chunk in (64, 256, 2048):
        chunked, _ = _tokens(models[kind], "sparsemm", budget,
                             dict(spec, pick=list(range(8))),
                             max_num_batched_tokens=chunk,
                             enable_chunked_prefill=True)
        assert chunked[0] == alone[0], f"chunk {chunk}"


def test_blocks_match_the_plan_and_nothing_leaks(models):
    """Aborts, forced preemption and NaN-poisoned released blocks."""
    from vllm import SamplingParams

    kind = "llava-small"
    prompts = _prompts(kind, 24, seed=7, text_len=150)
    budget = {"budget": 48, "window": 16}
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    want, _ = _tokens(models[kind], "sparsemm", budget,
                      dict(kind=kind, n=24, seed=7, text_len=150), 40)

    # few blocks and vLLM's optimistic admission (admission_reserve 0: the
    # sparsemm gate would admit so that none is preempted): requests get
    # preempted and recomputed; released blocks are NaN-filled, so any read
    # of one would show in the outputs
    # 4 layers x 4 heads x 16 tokens x 2 x 64 dims x 2 bytes = 64 KiB a block;
    # the pool must still hold one max_model_len request at its peak (its
    # prompt and its compacted blocks in the compaction step), or vLLM
    # refuses to start
    llm = _llm(models[kind], "sparsemm",
               dict(budget, debug_poison=True, admission_reserve=0),
               kv_cache_memory_bytes=72 * 64 * 1024, max_model_len=1024,
               max_num_seqs=24)
    sched = _scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    law = _worker_state(llm).law
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    done, checked, aborted, preempted = {}, 0, {"5", "17"}, set()
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        preempted |= {r.request_id.split("-")[0]
                      for r in sched.requests.values() if r.num_preemptions}
        steps += 1
        if steps == 6:
            engine.abort_request(list(aborted))
        for request in sched.running:
            held = sum(not b.is_null for b in
                       manager.req_to_blocks[request.request_id])
            processed = request.num_computed_tokens - request.num_in_flight_tokens
            if (law.compresses(request.num_prompt_tokens)
                    and processed > request.num_prompt_tokens):
                blocks = manager.req_to_blocks[request.request_id]
                if manager.prompt_released(request.request_id):
                    # the block law's count, not the full prompt's
                    assert held == law.compacted_blocks(
                        request.num_prompt_tokens,
                        request.num_computed_tokens -
                        request.num_prompt_tokens)
                    checked += 1
                else:  # the prompt goes back at a later schedule()
                    assert held == len(blocks)
    print(f"steps {steps}, block checks {checked}, preempted {sorted(preempted)}")
    assert checked > 0 and preempted
    assert pool.get_num_free_blocks() == free_at_start
    finished = {rid: tokens for rid, tokens in done.items()
                if rid not in aborted}
    assert len(finished) == len(prompts) - len(aborted)
    for rid, tokens in finished.items():
        assert len(tokens) == 40
        # a recomputed request re-prefills its outputs with full attention,
        # so only never-preempted requests must match the roomy run exactly
        if rid not in preempted:
            assert tokens == want[int(rid)], rid
    _close(llm)


def test_piecewise_graphs_give_eager_tokens(models):
    """vLLM's compile mode with full_cuda_graphs off: the attention runs
    eagerly between piecewise graphs, so tokens equal eager exactly."""
    spec = dict(kind="llava-small", n=6, seed=9, text_len=100)
    budget = {"budget": 48, "window": 16, "full_cuda_graphs": False}
    eager, _ = _tokens(models["llava-small"], "sparsemm", budget, dict(spec))
    compiled, _ = _tokens(models["llava-small"], "sparsemm", budget, dict(spec),
                          enforce_eager=False)
    assert compiled == eager


def test_full_cuda_graphs_replay_decode_steps(models):
    """``full_cuda_graphs`` (the default): uniform decode steps replay FULL graphs (the
    layers' Python forward does not run), and tokens agree with eager. Only
    the first 8 are required equal: under a graph FlashAttention sees
    max_seqlen_k = max_model_len and may split the KV differently, which
    changes the fp16 summation order, and tiny random models diverge after."""
    spec = dict(kind="llava-small", n=6, seed=9, text_len=100)
    budget = {"budget": 48, "window": 16}
    eager, _ = _tokens(models["llava-small"], "sparsemm", budget, dict(spec))
    full, _, calls = _tokens(models["llava-small"], "sparsemm", budget,
                             dict(spec),
                             enforce_eager=False, count_layer0_calls=True)
    assert calls < MAX_TOKENS // 2  # prefill steps only, decode replayed
    for want, got in zip(eager, full):
        assert got[:8] == want[:8]



def test_triton_decode_kernel_gives_flash_attn_tokens(models):
    """``decode_kernel: "triton"`` (eager, and replayed in full graphs) against
    FlashAttention, with eviction. Only the first 8 tokens are required equal:
    the two kernels sum in different orders (fp16 rounding), and tiny random
    models diverge after. FlashAttention is named, not left to the default,
    so the test keeps its meaning with VLLM_SPARSEMM_DECODE_KERNEL set."""
    spec = dict(kind="llava-small", n=6, seed=9, text_len=100)
    budget = {"budget": 48, "window": 16}
    want, _ = _tokens(models["llava-small"], "sparsemm",
                      {**budget, "decode_kernel": "flash_attn"}, dict(spec))
    for eager in (True, False):
        got, _ = _tokens(models["llava-small"], "sparsemm",
                         {**budget, "decode_kernel": "triton"}, dict(spec),
                         enforce_eager=eager)
        for a, b in zip(want, got):
            assert b[:8] == a[:8]


@pytest.mark.parametrize("eager", [True, False])
def test_steps_never_wait_for_the_device(models, eager):
    """No step's sparsemm code makes the host wait for the GPU: prompts in
    chunks beside compressed decode rows, selections and compactions (four
    requests at a time, 16 in all, prefix caching on as vLLM serves).
    Eager runs every layer's forward in Python; compile mode runs the
    mixed steps between piecewise graphs and replays FULL decode graphs."""
    spec = dict(kind="llava-small", n=16, seed=3, text_len=100)
    budget = {"budget": 48, "window": 16}
    _, lens, syncs, guarded = _tokens(
        models["llava-small"], "sparsemm", budget, dict(spec),
        guard_syncs=True, enforce_eager=eager, max_num_seqs=4,
        max_num_batched_tokens=256, enable_chunked_prefill=True,
        enable_prefix_caching=True)
    assert min(lens) > 48 and guarded > 0  # compressed, and checked
    ours = [site for site in syncs if "vllm_sparsemm" in site]
    print(f"sync checks: {guarded} calls; {len(syncs)} waits, "
          f"{len(ours)} in sparsemm: {sorted(set(syncs))[:20]}")
    assert not ours, "\n".join(sorted(set(ours)))
