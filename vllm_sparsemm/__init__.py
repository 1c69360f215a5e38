"""vllm-sparsemm: SparseMM's head-asymmetric KV-cache compression as a vLLM plugin.

Layers, each importing only those below it:

* ``core``: the algorithm and its memory arithmetic (score files, budgets,
  selection, pages, the block law, admission), torch and numpy only;
* ``kernels``: the CUDA and Triton kernels, each beside its PyTorch reference;
* ``engine``: the vLLM glue (plugin entry point, settings, KV-cache spec and
  manager, attention backend, worker state, metrics; every patch of vLLM
  internals in ``engine/patches.py``);
* ``tools``: the ``vllm-sparsemm`` command (plan, scores, plot, chase);
* ``testing``: tiny models, dummy model folders and the reference oracle.
"""

__version__ = "0.1.0"
