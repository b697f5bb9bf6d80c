#!/usr/bin/env bash
# Build a local stand-in for the CUDA PyTorch base image, since no image can be pulled here:
# debootstrap Debian bookworm (Python 3.11), create /opt/venv with torch 2.14.1 + torchvision
# 0.29.1 (the CUDA build, which also runs on CPUs) from the local wheel mirror, and
# `docker import` the result. Like the official images, python/pip/torchrun are on PATH.
#
#   ci/image/base.sh TAG WORKDIR
#
# Env: DOCKER (client), DEBIAN_MIRROR, WHEELS_DIR (torch/nvidia wheels), WHEELS_INDEX
# (a simple index with torchvision), UV (uv binary copied into the chroot), CA_BUNDLE_FILE.
set -euo pipefail

tag=${1:?usage: base.sh TAG WORKDIR}
work=${2:?usage: base.sh TAG WORKDIR}
DOCKER=${DOCKER:-/usr/bin/docker}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS_DIR=${WHEELS_DIR:-/opt/pypi-more/files}
WHEELS_INDEX=${WHEELS_INDEX:-/opt/pypi-more/simple}
UV=${UV:-$(command -v uv || true)}
CA_BUNDLE_FILE=${CA_BUNDLE_FILE:-/etc/ssl/certs/ca-certificates.crt}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}

rootfs=$work/rootfs

unmount_all() {
    # debootstrap mounts /proc and /sys inside the target; never delete through a mount.
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$rootfs/" | sort -r); do
        umount -l "$m" || true
    done
}
cleanup() {
    unmount_all
    rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

[ -x "$UV" ] || { echo "base.sh: uv not found (set UV=/path/to/uv)" >&2; exit 2; }
mkdir -p "$work"
cleanup

t0=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,procps \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
echo "base: debootstrap $((SECONDS - t0))s"

t0=$SECONDS
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
install -d "$rootfs/tmp/wheels" "$rootfs/tmp/index"
cp "$CA_BUNDLE_FILE" "$rootfs/tmp/ca.crt"
cp "$UV" "$rootfs/tmp/uv"
# Hard links where the mirror is on the same filesystem (no copy of 2 GB of wheels).
for w in "$WHEELS_DIR"/torch-*.whl "$WHEELS_DIR"/nvidia_*.whl "$WHEELS_DIR"/cuda_*.whl \
         "$WHEELS_DIR"/torchvision-*.whl; do
    cp -l "$w" "$rootfs/tmp/wheels/" 2>/dev/null || cp "$w" "$rootfs/tmp/wheels/"
done
chroot "$rootfs" python3 -m venv /opt/venv
chroot "$rootfs" env -i PATH=/usr/bin:/bin HOME=/root SSL_CERT_FILE=/tmp/ca.crt UV_CACHE_DIR=/tmp/uv-cache \
    /tmp/uv pip install --quiet --python /opt/venv/bin/python --find-links /tmp/wheels \
    "$TORCH_SPEC" "$TORCHVISION_SPEC"
chroot "$rootfs" /opt/venv/bin/python -c \
    'import torch, torchvision; print("base: torch", torch.__version__, "torchvision", torchvision.__version__)'
rm -rf "$rootfs/tmp/"* "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
: >"$rootfs/etc/resolv.conf"
echo "base: torch install $((SECONDS - t0))s ($(du -sh "$rootfs" | cut -f1))"

t0=$SECONDS
unmount_all
tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "base: docker import $((SECONDS - t0))s -> $tag"
