#!/usr/bin/env bash
# Install mmsegmentation 1.2.2 and MMDetection 3.3.0 with full mmcv 2.1.0 (compiled ops) into
# $PYTHON's environment.
#
# mmcv 2.1.0 (the last version mmseg 1.2.2 accepts; mmdet 3.3.0 accepts it too) has no wheel for
# current torch: it is built from its source package once (about 10 minutes on 2 cores), by $PYTHON
# itself so that it compiles against the torch that will import it (as C++20 where that torch's
# headers need it), and the wheel is cached per Python and torch version under
# $APT_DENSE_WHEEL_CACHE (default ~/.cache/apt-dense/wheels). A cached or installed mmcv
# without its compiled ops (mmcv/_ext) is rebuilt, with a message that says why.
set -euo pipefail
PYTHON=${PYTHON:-python3}

IMPORTS="import mmcv._ext, mmcv.ops, mmseg, mmdet, pkg_resources"
ops_ok() { "$PYTHON" -c "$IMPORTS" >/dev/null 2>&1; }
wheel_has_ops() {
    "$PYTHON" - "$1" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(0 if any(n.startswith("mmcv/_ext") and n.endswith(".so") for n in names) else 1)
EOF
}

if ops_ok; then
    exit 0
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install_openmmlab.sh: torch is not importable by $PYTHON; install torch first (make install)" >&2
    exit 1
fi
versions=$("$PYTHON" -c "import sys, torch; print(f'py{sys.version_info.major}{sys.version_info.minor}-torch-{torch.__version__}')")
cache="${APT_DENSE_WHEEL_CACHE:-$HOME/.cache/apt-dense/wheels}/${versions}"
mkdir -p "$cache"
# mmcv's build and mmengine's config lookup ("mmseg::...") need pkg_resources (setuptools < 81).
"$PYTHON" -m pip install --quiet "setuptools<81" wheel

wheel=$(ls "$cache"/mmcv-2.1.0-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ] && ! wheel_has_ops "$wheel"; then
    echo "install_openmmlab.sh: cached $wheel has no compiled ops (mmcv/_ext); it was built without torch. Rebuilding." >&2
    rm -f "$wheel"
    wheel=""
fi
if [ -z "$wheel" ]; then
    echo "building mmcv 2.1.0 with its ops against ${versions} (about 10 minutes on 2 cores, once; cached in ${cache})"
    build_dir=$(mktemp -d)
    # From the source package, unpacked here: a local build is never served from pip's wheel cache
    # (which once handed back an ops-less build), and its setup.py can be adapted to this torch.
    "$PYTHON" -m pip download --quiet --no-deps --no-binary mmcv --no-build-isolation -d "$build_dir" mmcv==2.1.0
    tar -xzf "$build_dir"/mmcv-2.1.0.tar.gz -C "$build_dir"
    if "$PYTHON" - <<'EOF'
import pathlib, sys, torch.utils.cpp_extension as ext
header = pathlib.Path(ext.include_paths()[0], "ATen", "ATen.h").read_text()
sys.exit(0 if "C++20 or later" in header else 1)
EOF
    then
        # torch >= 2.14's headers need C++20; mmcv 2.1.0's setup.py asks for C++17 (its sources build as C++20).
        echo "install_openmmlab.sh: this torch needs C++20; building mmcv's ops with -std=c++20"
        sed -i 's/-std=c++17/-std=c++20/' "$build_dir/mmcv-2.1.0/setup.py"
    fi
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PYTHON" -m pip wheel --no-deps --no-build-isolation \
        -w "$build_dir" "$build_dir/mmcv-2.1.0"
    wheel=$(ls "$build_dir"/mmcv-2.1.0-*.whl)
    if ! wheel_has_ops "$wheel"; then
        echo "install_openmmlab.sh: the mmcv build produced no compiled ops; see the compiler output above" >&2
        exit 1
    fi
    mv "$wheel" "$cache/"
    wheel="$cache/$(basename "$wheel")"
    rm -rf "$build_dir"
fi
# --force-reinstall replaces an ops-less mmcv 2.1.0 that may be installed already.
"$PYTHON" -m pip install --quiet --force-reinstall --no-deps "$wheel"
"$PYTHON" -m pip install --quiet "$wheel" "mmengine>=0.10,<1" "mmsegmentation==1.2.2" "mmdet==3.3.0" ftfy regex
if ! ops_ok; then
    echo "install_openmmlab.sh: mmcv is installed but '$IMPORTS' fails:" >&2
    "$PYTHON" -c "$IMPORTS" >&2 || true
    exit 1
fi
echo "mmcv 2.1.0 with compiled ops, mmengine, mmsegmentation 1.2.2 and mmdet 3.3.0 installed for $PYTHON"
