"""vllm-sparsemm: SparseMM head-asymmetric KV-cache eviction as a vLLM plugin.

The algorithm lives in small torch-only modules (``head_scores``, ``budget``,
``selection``, ``page_plan``, ``kv_ops``) that import no vLLM; the vLLM glue
imports them.
"""

__version__ = "0.1.0"
