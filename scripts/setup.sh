#!/usr/bin/env bash
# Installs the system packages LogPool builds against (Debian): liblz4 and libxxhash
# with their pkg-config files, and the real clients the tests run against: qemu-utils
# (qemu-img, qemu-io), libnbd-bin (nbdinfo, nbdcopy, nbdfuse), e2fsprogs and xfsprogs
# (mkfs, e2fsck and xfs_repair for scripts/thesis.sh, which also needs root, /dev/fuse and
# loop devices),
# fio (its nbd engine), and nbdkit (the baseline of scripts/bench-nbd.sh). Idempotent; uses sudo when not root.
set -euo pipefail
packages=(liblz4-dev libxxhash-dev pkg-config qemu-utils libnbd-bin e2fsprogs xfsprogs fio nbdkit)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
