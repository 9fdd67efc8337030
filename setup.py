from pathlib import Path

from setuptools import find_packages, setup

# detectron2's own install_requires (its setup.py), for running it from source.
DETECTRON2_DEPS = [
    "pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate", "cloudpickle",
    "tqdm>4.29.0", "tensorboard", "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10", "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1", "black", "packaging", "timm", "shapely", "setuptools<81",
]
SAM = ["segment-anything==1.0", "segment-anything-hq==0.3"]  # both import torchvision
TRANSFORMERS = ["transformers>=5,<6"]
EXPORT = ["onnx", "onnxruntime", "onnxscript"]

setup(
    name="apt-dense",
    version="0.1.0",
    description="Adaptive Patch Transformers for dense prediction: faster ViT detectors and segmenters",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["apt_dense", "apt_dense.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # Sample photos for the demo and tests; pillow writes the patch-map picture.
        "demo": ["scikit-image", "pillow", "matplotlib"],
        "flash": ["flash-attn"],
        # mmcv must be built with its ops: use tools/install_openmmlab.sh (it caches the wheel).
        "mmseg": ["mmsegmentation==1.2.2", "mmengine>=0.10,<1", "mmcv>=2.0.0rc4,<2.2.0", "ftfy", "regex", "setuptools<81"],
        # What detectron2 (not on PyPI; install it from source) needs beside torch + torchvision.
        "detectron2": DETECTRON2_DEPS,
        "sam": SAM,
        "transformers": TRANSFORMERS,
        "export": EXPORT,
        "dev": ["pytest>=7", "hypothesis>=6", "scikit-image", "pillow", "matplotlib",
                *DETECTRON2_DEPS, *SAM, *TRANSFORMERS, *EXPORT],
    },
    license="Apache-2.0",
)
