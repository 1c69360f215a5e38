"""What each arm of the video benchmark keeps in its KV cache, so that vLLM's
own video-token pruning (EVS) can be set to keep as much as sparsemm.

sparsemm keeps, per KV head, ``min(N, B)`` of a prompt's ``N`` tokens (with
uniform head scores exactly, with scored heads on average over them) and
every decoded token. EVS (``--video-pruning-rate r``; vLLM's
``multimodal/evs.py``, applied by the Qwen2.5-VL model) drops video tokens
before the language model sees them: a video of ``T`` temporal steps of
``F`` tokens keeps ``max(F, int(T * F * (1 - r)))`` of them; the text and
every decoded token stay. Equal retained KV is then
``text + kept video = min(N, B)``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

# the model types whose video prompts these counts describe (one vision
# start, video pads, one vision end); EVS runs on Qwen2.5-VL only here
QWEN_VIDEO_TYPES = ("qwen2_vl", "qwen2_5_vl")
EVS_TYPES = ("qwen2_5_vl",)


def sparsemm_prompt_kv(prompt_tokens: int, budget: int) -> int:
    """Prompt tokens a KV head keeps under sparsemm at budget ``budget``."""
    return min(prompt_tokens, budget)


def evs_prompt_kv(text: int, video: int, per_frame: int,
                  rate: float) -> int:
    """Prompt tokens left after EVS at ``rate``, as vLLM counts them."""
    if not rate:
        return text + video
    return text + max(per_frame, int(video * (1 - rate)))


def evs_pruning_rate(text: int, video: int, per_frame: int,
                     budget: int) -> float:
    """The ``--video-pruning-rate`` at which EVS keeps the prompt tokens
    sparsemm keeps at ``budget``: 0 when sparsemm compresses nothing, and
    never past one temporal step's tokens (EVS keeps the first step)."""
    target = max(sparsemm_prompt_kv(text + video, budget) - text, per_frame)
    if target >= video:
        return 0.0
    # aim half a token above the target, so that int() lands on it whatever
    # the float rounding; six decimals move T * F * (1 - r) by far less
    return round(1 - (target + 0.5) / video, 6)


def arm_prompt_kv(backend: str, tokens: dict, budget: int | None = None,
                  rate: float | None = None) -> int:
    """Planned prompt KV tokens per request (per KV head) of one arm."""
    prompt = tokens["text"] + tokens["video"]
    if backend == "sparsemm":
        return sparsemm_prompt_kv(prompt, budget)
    if backend == "evs":
        return evs_prompt_kv(tokens["text"], tokens["video"],
                             tokens["per_frame"], rate)
    return prompt


def model_type(model_dir) -> str | None:
    import json
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("model_type")


@functools.lru_cache(maxsize=None)
def processor_of(model_dir: str):
    """The model folder's processor, loaded once (``serve_matrix.py`` counts
    multi-turn prompts with it too)."""
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(model_dir)


def video_prompt_tokens(model_dir, frames: int, size,
                        question: str) -> dict | None:
    """The tokens of a chat prompt of one video (``frames`` of ``size``,
    WxH) and ``question``, counted by the model folder's own processor,
    which vLLM runs too: ``text`` (chat template and question), ``video``,
    ``per_frame`` (one temporal step's) and ``steps``. None for a model
    that is not Qwen2-VL-like."""
    if model_type(model_dir) not in QWEN_VIDEO_TYPES:
        return None
    processor = processor_of(str(model_dir))
    messages = [{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    pad = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    width, height = size
    blank = np.zeros((frames, height, width, 3), dtype=np.uint8)
    grid = processor.video_processor(videos=[blank], return_tensors="np")
    steps, rows, cols = (int(x) for x in grid["video_grid_thw"][0])
    merged = processor.video_processor.merge_size ** 2
    return {"text": len(ids) - ids.count(pad),
            "video": steps * rows * cols // merged,
            "per_frame": rows * cols // merged, "steps": steps}
