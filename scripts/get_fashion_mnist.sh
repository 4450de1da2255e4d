#!/usr/bin/env bash
# Fetch Fashion-MNIST (60k train + 10k test, 28x28 IDX files) from the Debian package
# `dataset-fashion-mnist`; no download at run time afterwards. Idempotent: exits at once when the files exist.
#
#   scripts/get_fashion_mnist.sh           # as root: apt-get install; otherwise apt-get download + dpkg -x
#   scripts/get_fashion_mnist.sh --local   # always unpack into the project folder (never touch the system)
#
# Where the files end up (the same places mim.data.fashion_mnist looks, in this order):
#   $MIM_DATA_DIR/fashion-mnist/           when MIM_DATA_DIR is set (the unpack target too)
#   <repo>/.data/fashion-mnist/            apt-get download + dpkg -x (no root needed)
#   /usr/share/datasets/fashion-mnist/     apt-get install dataset-fashion-mnist (as root)
set -euo pipefail

PACKAGE=dataset-fashion-mnist
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL_DIR="${MIM_DATA_DIR:-$REPO_DIR/.data}/fashion-mnist"
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

local_only=0
case "${1:-}" in
    --local) local_only=1 ;;
    "") ;;
    *) echo "usage: $0 [--local]" >&2; exit 2 ;;
esac

has_files() {  # has_files DIR: all four IDX files, gzipped or not
    local f
    for f in "${FILES[@]}"; do
        [[ -f "$1/$f.gz" || -f "$1/$f" ]] || return 1
    done
}

candidates=()
[[ -n "${MIM_DATA_DIR:-}" ]] && candidates+=("$MIM_DATA_DIR" "$MIM_DATA_DIR/fashion-mnist")
candidates+=("$REPO_DIR/.data/fashion-mnist")
[[ $local_only == 0 ]] && candidates+=("$SYSTEM_DIR")
for dir in "${candidates[@]}"; do
    if has_files "$dir"; then
        echo "Fashion-MNIST already present in $dir"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    echo "error: Fashion-MNIST not found and apt-get/dpkg are not available (not a Debian/Ubuntu system)." >&2
    echo "Put the four IDX files (${FILES[*]}, .gz or not) in a folder and set MIM_DATA_DIR to it." >&2
    exit 1
fi

if [[ $local_only == 0 && $(id -u) == 0 ]]; then
    echo "Installing the Debian package $PACKAGE (apt-get install, as root) ..."
    if apt-get install -y --no-install-recommends "$PACKAGE" >/dev/null \
        || { apt-get update -qq && apt-get install -y --no-install-recommends "$PACKAGE" >/dev/null; }; then
        if has_files "$SYSTEM_DIR"; then
            echo "Installed $PACKAGE with apt-get install; Fashion-MNIST is in $SYSTEM_DIR"
            exit 0
        fi
    fi
    echo "apt-get install did not provide the files; falling back to apt-get download + dpkg -x" >&2
fi

echo "Downloading $PACKAGE (apt-get download) and unpacking it into $LOCAL_DIR ..."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt's sandbox user (_apt) must be able to write the .deb here, else apt warns and downloads unsandboxed
if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then chown _apt "$work"; fi
if ! (cd "$work" && apt-get download "$PACKAGE" >/dev/null); then
    if [[ $(id -u) == 0 ]]; then
        apt-get update -qq
        (cd "$work" && apt-get download "$PACKAGE" >/dev/null)
    else
        echo "error: apt-get download $PACKAGE failed (no package lists?). Run 'sudo apt-get update' once," \
            "or as root: apt-get install $PACKAGE" >&2
        exit 1
    fi
fi
dpkg -x "$work"/"$PACKAGE"_*.deb "$work/root"
mkdir -p "$(dirname "$LOCAL_DIR")"
rm -rf "$LOCAL_DIR.partial"
mv "$work/root/usr/share/datasets/fashion-mnist" "$LOCAL_DIR.partial"
rm -rf "$LOCAL_DIR"
mv "$LOCAL_DIR.partial" "$LOCAL_DIR"  # appears complete or not at all
has_files "$LOCAL_DIR"
echo "Unpacked $PACKAGE with apt-get download + dpkg -x; Fashion-MNIST is in $LOCAL_DIR"
