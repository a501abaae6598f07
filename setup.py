from setuptools import find_packages, setup

setup(
    name="megatron-ast",
    version="0.1.0",
    description="Dense LLM -> 2:4 semi-structured sparse LLM: AST training on DeepSpeed ZeRO-3, one-shot pruners, token-shard tools",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ast", "megatron_ast.*", "data_tools", "data_tools.*"]),
    package_data={"megatron_ast.training": ["*.c"],  # SR-STE's CPU step, built at first use (training/srste_cpu.py)
                  "megatron_ast.examples": ["ds_configs/*.json", "launch/*"]},  # what `megatron-ast init` copies
    install_requires=[
        "torch>=2.2",  # not pinned: clusters bring their own CUDA build
        "numpy",
        "transformers>=4.56",
        "tokenizers>=0.20",
        "tiktoken>=0.7",  # the byte-level BPE fast path of preprocess (megatron_ast/data/fast_bpe.py)
        "sentencepiece",
        "safetensors",
        "gguf",
        "accelerate",
        "zstandard",
        "datasets>=3.1",  # parquet, Arrow and dataset dirs in (data/documents.py); IterableDataset.shard from 3.1
        "pyarrow>=15",
        "tqdm",
        "pyyaml",
        "deepspeed>=0.19.8,<0.20",  # the tested range; its internals are checked at start-up (training/mask_partitions.py)
    ],
    extras_require={
        "mpi": ["mpi4py>=4"],
        "eval": ["lm-eval>=0.4.9"],
        "dev": ["pytest", "megatron-core", "mpi4py>=4", "mpich", "psutil", "peft", "lm-eval>=0.4.9", "matplotlib",
                "compressed-tensors==0.20.1"],  # the release our vLLM-format dirs are read back with (FORMAT_VERSION)
    },
    entry_points={"console_scripts": ["megatron-ast=megatron_ast.cli:main"]},
)
