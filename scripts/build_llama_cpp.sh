#!/usr/bin/env bash
# Build llama.cpp's native tools and shared libraries ONCE, from the vendored llama.cpp inside the
# llama-cpp-python sdist, so bindings, converter scripts and tools share one llama.cpp commit.
# Result (cached, keyed by version): $FTX_CACHE/llama.cpp/<version>/{src,bin,lib}
#   src/  the sdist (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py/ under vendor/llama.cpp)
#   bin/  llama-server llama-quantize llama-perplexity llama-imatrix
#   lib/  libllama.so libggml*.so (loaded by the llama_cpp bindings through LLAMA_CPP_LIB_PATH / copied in)
# Never called at export time: `make` runs it while creating the environment.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${FTX_CACHE:-$HOME/.cache/ftx}"
DEST="$CACHE/llama.cpp/$VERSION"
PIP="${PIP:-python3 -m pip}"
# AMX off: -march=native turns on llama.cpp's AMX kernels wherever the CPU flags list amx_tile, but a VM may list
# it without granting the tile state: llama-server then dies with SIGILL on `tilezero` at its first decode
# (measured on a Firecracker VM whose /proc/cpuinfo lists amx_tile/int8/bf16). Every other ISA stays native.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_ID="noamx1"  # bump when the build flags change: a cached build from other flags is rebuilt
if [ -x "$DEST/bin/llama-server" ] && [ -f "$DEST/lib/libllama.so" ] && [ -f "$DEST/.complete-$BUILD_ID" ]; then
  echo "llama.cpp $VERSION: cached at $DEST"; exit 0
fi
echo "llama.cpp $VERSION: building native tools into $DEST (one time, ~8 min on 2 cores)"
TMP="$(mktemp -d "$CACHE/.llama-build.XXXXXX" 2>/dev/null || (mkdir -p "$CACHE" && mktemp -d "$CACHE/.llama-build.XXXXXX"))"
trap 'rm -rf "$TMP"' EXIT
$PIP download --quiet --no-deps --no-binary=:all: "llama-cpp-python==$VERSION" -d "$TMP/dl" 2>&1 | { grep -v "^WARNING: Location" || true; }
tar xzf "$TMP"/dl/llama_cpp_python-"$VERSION".tar.gz -C "$TMP"
mv "$TMP/llama_cpp_python-$VERSION" "$TMP/src"
cmake -S "$TMP/src/vendor/llama.cpp" -B "$TMP/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN:$ORIGIN/../lib' >"$TMP/cmake.log" 2>&1 \
  || { tail -30 "$TMP/cmake.log"; exit 1; }
cmake --build "$TMP/build" -j"$(nproc)" --target llama-server llama-quantize llama-perplexity llama-imatrix llama \
  >"$TMP/build.log" 2>&1 || { tail -40 "$TMP/build.log"; exit 1; }
mkdir -p "$TMP/out/bin" "$TMP/out/lib"
for t in llama-server llama-quantize llama-perplexity llama-imatrix; do cp "$TMP/build/bin/$t" "$TMP/out/bin/"; done
find "$TMP/build" -name '*.so*' -exec cp -P {} "$TMP/out/lib/" \;
mv "$TMP/src" "$TMP/out/src"
rm -rf "$DEST"; mkdir -p "$(dirname "$DEST")"; mv "$TMP/out" "$DEST"
touch "$DEST/.complete" "$DEST/.complete-$BUILD_ID"
echo "llama.cpp $VERSION: built $(ls "$DEST/bin" | tr '\n' ' ')"
