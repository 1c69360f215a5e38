"""Build vllm-sparsemm. The CUDA extension (csrc/) is built only when a CUDA
toolkit and a CUDA-enabled torch are present; otherwise the package installs
without it and uses its PyTorch references."""

import os
import sys

from setuptools import find_packages, setup


def cuda_extension():
    """The CUDA extension, or None with one line saying why it is skipped."""
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable at build time (build with --no-build-isolation)"
    else:
        forced = os.environ.get("VLLM_SPARSEMM_BUILD_CUDA")
        if forced == "0":
            reason = "VLLM_SPARSEMM_BUILD_CUDA=0"
        elif torch.version.cuda is None:
            reason = "torch has no CUDA support"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        elif forced != "1" and not torch.cuda.is_available():
            reason = "no GPU visible (set VLLM_SPARSEMM_BUILD_CUDA=1 to build anyway)"
    if reason:
        print(f"vllm-sparsemm: skipping the CUDA extension: {reason}; "
              f"the PyTorch reference kernels will be used", file=sys.stderr)
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # +PTX: GPUs newer than sm_90 JIT the kernels instead of failing with
        # "no kernel image is available"; older ones fall back to PyTorch
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    ext = CUDAExtension(
        name="vllm_sparsemm._C",
        sources=["csrc/copy_rows.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return ext, BuildExtension


built = cuda_extension()
setup(
    name="vllm-sparsemm",
    version="0.1.0",
    description="SparseMM head-asymmetric KV-cache eviction for multimodal "
    "models, as a vLLM attention-backend plugin",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_sparsemm", "vllm_sparsemm.*"]) +
    ["vllm_sparsemm.score_files"],
    package_dir={"vllm_sparsemm.score_files": "head_scores"},
    package_data={"vllm_sparsemm.score_files": ["*.json"]},
    install_requires=[
        "vllm==0.26.0",
        "transformers>=5.5.3,<5.17",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "requests", "openai", "matplotlib",
                 "qwen-vl-utils", "decord; platform_machine == 'x86_64'"],
        # qwen-vl-utils reads videos with decord, torchcodec (FFmpeg's shared
        # libraries needed) or torchvision (whose reader vLLM's torchvision
        # no longer has); decord brings its own, with wheels for Intel and AMD
        # processors only
        "qwen": ["qwen-vl-utils", "decord; platform_machine == 'x86_64'"],
        "plot": ["matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["sparsemm = vllm_sparsemm.engine.plugin:register"],
        "console_scripts": ["vllm-sparsemm = vllm_sparsemm.tools.cli:main"],
    },
    ext_modules=[built[0]] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
    zip_safe=False,
)
