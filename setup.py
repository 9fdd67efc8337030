from pathlib import Path

from setuptools import find_packages, setup

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
        "dev": ["pytest>=7", "hypothesis>=6", "scikit-image", "pillow", "matplotlib"],
    },
    license="Apache-2.0",
)
