#!/usr/bin/env bash
# Install Fashion-MNIST from the Debian package `dataset-fashion-mnist` if its files are missing.
# Idempotent: does nothing when the four gzip IDX files are already there.
# The files land in /usr/share/datasets/fashion-mnist (benchmarks/datasets.py fashion_mnist_lt's default).
set -euo pipefail

DIR=/usr/share/datasets/fashion-mnist
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() {
  local f
  for f in "${FILES[@]}"; do
    [ -s "$DIR/$f" ] || return 1
  done
}

if have_all; then
  echo "Fashion-MNIST already installed in $DIR"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: apt-get not found; install the Debian package dataset-fashion-mnist by other means," >&2
  echo "       or put the four IDX files in a folder and pass it as root= to fashion_mnist_lt" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "error: installing dataset-fashion-mnist needs root (run this script as root)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "Installing dataset-fashion-mnist (apt-get update, then apt-get install) ..."
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dataset-fashion-mnist

if have_all; then
  echo "Fashion-MNIST installed in $DIR"
else
  echo "error: dataset-fashion-mnist is installed but the IDX files are not in $DIR:" >&2
  dpkg -L dataset-fashion-mnist >&2 || true
  exit 1
fi
