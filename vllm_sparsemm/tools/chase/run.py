"""Run the chase over a folder of images: progress, periodic saves, resume."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import torch

from vllm_sparsemm import __version__
from vllm_sparsemm.tools.chase.data import load_ocr_folder
from vllm_sparsemm.tools.chase.scorer import PROMPT, prepare_model, score_image

logger = logging.getLogger(__name__)


def load_model(model_dir: str, device: str = "auto",
               random_weights: bool = False):
    """A transformers LLaVA / LLaVA-NeXT / Qwen2-VL model and its processor.

    ``random_weights`` builds the model from its config alone (a folder with no
    weights, for timing runs).
    """
    from transformers import (AutoConfig, AutoModelForImageTextToText,
                              AutoProcessor)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if random_weights:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(
                config, dtype=dtype, attn_implementation="eager")
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager").to(device)
    return prepare_model(model.eval()), AutoProcessor.from_pretrained(model_dir)


def _sidecar(out: Path) -> Path:
    return out.with_name(out.stem + ".meta.json")


def chase(model, processor, data_dir: str | Path, out: str | Path,
          max_images: int | None = None, max_new_tokens: int = 256,
          save_every: int = 10, model_name: str = "", progress: bool = True
          ) -> dict[str, list[float]]:
    """Score every (layer, query head) over the images of ``data_dir``.

    Writes the authors' format (``{"<layer>-<head>": [one score per image]}``)
    to ``out`` every ``save_every`` images and at the end, with a sidecar
    ``<out>.meta.json``; a rerun with the same ``out`` resumes after the
    images already scored.
    """
    out = Path(out)
    samples = load_ocr_folder(data_dir)[:max_images]
    text = model.config.get_text_config()
    keys = [f"{l}-{h}" for l in range(text.num_hidden_layers)
            for h in range(text.num_attention_heads)]
    scores = {k: [] for k in keys}
    done: list[str] = []
    if out.is_file() and _sidecar(out).is_file():
        meta = json.loads(_sidecar(out).read_text())
        done = meta["images"]
        scores = json.loads(out.read_text())
        assert list(scores) == keys, f"{out} was computed for another model"
        logger.info("resuming %s after %d images", out, len(done))
    todo = [s for s in samples if s.image.name not in set(done)]
    bar = _progress(len(todo), progress)
    for n, sample in enumerate(todo, 1):
        result = score_image(model, processor, sample, max_new_tokens)
        for (l, h), value in zip(
                ((l, h) for l in range(text.num_hidden_layers)
                 for h in range(text.num_attention_heads)),
                result.scores.flatten().tolist()):
            scores[f"{l}-{h}"].append(value)
        done.append(sample.image.name)
        bar(f"{sample.image.name}: {len(result.tokens)} tokens, "
            f"{result.matched} matched")
        if n % save_every == 0 or n == len(todo):
            _save(out, scores, done, model_name, max_new_tokens)
    if not todo:
        _save(out, scores, done, model_name, max_new_tokens)
    return scores


def _save(out: Path, scores, done, model_name, max_new_tokens) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(scores))
    tmp.replace(out)
    _sidecar(out).write_text(json.dumps({
        "model": model_name, "images": done, "num_images": len(done),
        "prompt": PROMPT, "max_new_tokens": max_new_tokens,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "tool": f"vllm-sparsemm {__version__}"}, indent=1))


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda message: None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="image")

    def step(message):
        bar.set_postfix_str(message)
        bar.update()

    return step
