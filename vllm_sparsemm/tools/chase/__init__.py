"""``vllm-sparsemm chase``: compute visual-head score files for a model.

Python API: :func:`chase` (files in, score file out), :func:`score_image` (one
image), :func:`generate_ocr_images` / :func:`load_ocr_folder` (data).
"""

from vllm_sparsemm.tools.chase.data import (OcrSample, generate_ocr_images,
                                            load_ocr_folder)
from vllm_sparsemm.tools.chase.run import chase, load_model
from vllm_sparsemm.tools.chase.scorer import prepare_model, score_image

__all__ = ["OcrSample", "chase", "generate_ocr_images", "load_model",
           "load_ocr_folder", "prepare_model", "score_image"]
