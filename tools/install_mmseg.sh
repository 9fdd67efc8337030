#!/usr/bin/env bash
# Install mmsegmentation 1.2.2 with full mmcv 2.1.0 (compiled ops) into $PYTHON's environment.
# mmcv 2.1.0 (the last version mmseg 1.2.2 accepts) has no wheel for current torch: it is built
# from its source package once (about 10 minutes on 2 cores) and the wheel is cached per torch
# version under $APT_DENSE_WHEEL_CACHE (default ~/.cache/apt-dense/wheels).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if "$PYTHON" -c "import mmcv.ops, mmseg, pkg_resources" 2>/dev/null; then
    exit 0
fi
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
cache="${APT_DENSE_WHEEL_CACHE:-$HOME/.cache/apt-dense/wheels}/torch-${torch_version}"
mkdir -p "$cache"
# mmengine's config lookup ("mmseg::...") and mmcv's build need pkg_resources.
"$PYTHON" -m pip install "setuptools<81"
if ! ls "$cache"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    echo "building mmcv 2.1.0 against torch ${torch_version} (once; cached in ${cache})"
    build_env=$(mktemp -d)
    "$PYTHON" -m venv --system-site-packages "$build_env"
    "$build_env/bin/python" -m pip install "setuptools<81" wheel
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" "$build_env/bin/python" -m pip wheel --no-deps --no-build-isolation \
        -w "$cache" mmcv==2.1.0
    rm -rf "$build_env"
fi
"$PYTHON" -m pip install "$cache"/mmcv-2.1.0-*.whl "mmengine>=0.10,<1" "mmsegmentation==1.2.2" ftfy regex
