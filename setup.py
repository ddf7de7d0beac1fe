"""ESPnet2 plugin: efficient end-to-end ASR encoders, attention variants and a recipe engine."""

from setuptools import find_packages, setup

setup(
    name="espnet_plugin",
    version="0.1.0",
    description="ConMamba, H-Net dynamic chunking and KV-efficient attention for ESPnet2 ASR",
    packages=find_packages(include=["espnet_plugin", "espnet_plugin.*"]),
    # The fused CPU kernels' source, compiled on the user's machine (espnet_plugin.nets.cpu_kernels).
    package_data={"espnet_plugin": ["csrc/*.cpp"]},
    python_requires=">=3.11",
    install_requires=[
        # espnet 202511 is the newest for Python 3.11; it pins setuptools<74, which keeps
        # torch at 2.12.x (torch 2.13 wants setuptools>=77). torchaudio 2.11.0 loads with it;
        # 2.11.1 does not (libtorchaudio.so: undefined symbol torch_exception_get_what_...).
        "espnet>=202511; python_version<'3.12'",
        # espnet 202611 moved what ASR training needs (editdistance for the error rates,
        # ctc-segmentation) into its "asr" extra.
        "espnet[asr]>=202611; python_version>='3.12'",
        "torch>=2.1,<2.13; python_version<'3.12'",
        "torch>=2.1; python_version>='3.12'",
        "torchaudio==2.11.0; python_version<'3.12'",
        "torchaudio; python_version>='3.12'",
        "numpy",
        "sentencepiece",
        "jiwer>=3.0",
        "kaldiio",
        "matplotlib",
        "soundfile",
        "tensorboard",  # ESPnet's trainer logs to it by default
        "ninja",  # torch.utils.cpp_extension builds the fused CPU kernels with it
    ],
    extras_require={
        # huggingface_hub: asr.sh stage 13's upload (its test calls it up to the network).
        "test": ["pytest", "huggingface_hub"],
        "hub": ["huggingface_hub"],
        # benchmark_scan's comparison with mambapy's pure-PyTorch Mamba; never imported otherwise.
        "benchmark": ["mambapy"],
        # The fused Mamba kernels only build against a CUDA torch.
        "cuda": ["mamba-ssm", "causal-conv1d"],
    },
)
