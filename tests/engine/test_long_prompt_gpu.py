"""A 128K-token prompt on a dummy-weight 7B text model (Qwen2-7B's shape)
under ``"head_scores": "uniform"``, prefilled in 16,384-token chunks, with
the KV pool sized from vLLM's memory profile as users run it. The selection's
scratch and window queries are in that profile or bounded by design
(``SELECTION_TOKENS``), so nothing runs out of memory, and the prompt is
compressed to its budget. It sizes its pool from free memory, so
tests/gpu/run_all.sh runs it alone."""

import os

import numpy as np
import pytest

from serving import until_compressed

pytestmark = pytest.mark.gpu
# the engine in this process: pytest's CUDA would not survive a fork
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT = 128 * 1024
CHUNK = 16384
BUDGET = 1024


def test_a_128k_prompt_compresses_in_16k_chunks_within_memory(tmp_path):
    from vllm import LLM, SamplingParams

    from vllm_sparsemm.testing.checkpoints import write_dummy_qwen2_7b_text
    model = write_dummy_qwen2_7b_text(tmp_path / "qwen2-7b", PROMPT + 64)
    llm = LLM(model=str(model), load_format="dummy", dtype="bfloat16",
              attention_backend="sparsemm", max_model_len=PROMPT + 64,
              max_num_batched_tokens=CHUNK, max_num_seqs=8, seed=0,
              enforce_eager=True, disable_log_stats=False,
              additional_config={"sparsemm": {"head_scores": "uniform",
                                              "budget": BUDGET}})
    rng = np.random.default_rng(0)
    long = rng.integers(100, 150000, PROMPT - 16).tolist()
    # a short prompt beside it shares the 16K-token steps with its chunks
    short = rng.integers(100, 150000, 3000).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": long},
                            {"prompt_token_ids": short}], params,
                           use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16, 16]
    counts = until_compressed(lambda: _sparsemm_metrics(llm), 2,
                              "vllm:sparsemm_requests_compressed")
    kept = counts["vllm:sparsemm_prompt_tokens_kept"]
    full = counts["vllm:sparsemm_prompt_tokens_full"]
    print(f"long prompt: {len(long)} + {len(short)} tokens, kept "
          f"{kept:.1f} per head of {full:.0f}")
    assert full == len(long) + len(short)
    # each request keeps about its budget per head (uniform scores)
    assert 1.5 * BUDGET < kept <= 2 * BUDGET


def _sparsemm_metrics(llm) -> dict[str, float]:
    """The engine's vllm:sparsemm_* counters and gauges, by name."""
    return {m.name: m.value for m in llm.get_metrics()
            if m.name.startswith("vllm:sparsemm_") and hasattr(m, "value")}
