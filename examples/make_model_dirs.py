"""Write model folders vLLM can load without downloading anything.

    python examples/make_model_dirs.py /tmp/models

creates ``llava-1.5-7b`` (real LLaVA-1.5-7B config, tokenizer and processor, no
weights), ``tiny-llava`` and ``tiny-qwen2-vl`` (tiny random checkpoints, for
correctness checks). LLaVA-1.5 has no score file of its own; serve it with
the shipped Vicuna-7B one and random weights::

    VLLM_SPARSEMM_HEAD_SCORES=llava-v1.6-vicuna-7b vllm serve \
        /tmp/models/llava-1.5-7b --attention-backend sparsemm \
        --load-format dummy
"""

import argparse
from pathlib import Path

from vllm_sparsemm.testing.checkpoints import (save_tiny_llava,
                                               save_tiny_qwen2_vl,
                                               write_dummy_llava_15_7b)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    print(write_dummy_llava_15_7b(out / "llava-1.5-7b"))
    print(save_tiny_llava(out / "tiny-llava", num_layers=4, num_heads=4,
                          num_kv_heads=4, head_dim=64, image_size=336))
    print(save_tiny_qwen2_vl(out / "tiny-qwen2-vl", num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=64))


if __name__ == "__main__":
    main()
