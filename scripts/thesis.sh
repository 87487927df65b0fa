#!/usr/bin/env bash
# The go-volumes thesis on a real kernel: a filesystem that is not copy-on-write (ext4, or
# XFS) on an overcommitted LogPool volume, served over NBD and attached through nbdfuse and
# a loop device, sees ordinary write errors when the pool fills, and the snapshot taken
# before stays intact: the filesystem's own checker (e2fsck -fn, xfs_repair -n) passes on
# it and its files match their checksums. The snapshot is taken while the filesystem is
# mounted (fsfreeze, then `logpool snapshot` through the server's control socket). Then
# freeing space (destroying another volume) lets the filesystem recover (e2fsck -fy; for
# XFS, mounting replays its log) and its old files read back unchanged.
#
# Usage: scripts/thesis.sh PATH-TO-logpool [ext4|xfs]   (default ext4)
# Exit 0 passed, 77 skipped (not root, no /dev/fuse, a tool missing; the reason is printed),
# anything else failed.
set -euo pipefail
logpool=${1:?usage: thesis.sh PATH-TO-logpool [ext4|xfs]}
fs=${2:-ext4}

skip() { echo "SKIPPED: $*"; exit 77; }
case "$fs" in
    ext4) tools=(mkfs.ext4 e2fsck) ;;
    xfs) tools=(mkfs.xfs xfs_repair) ;;
    *) echo "unknown filesystem $fs (ext4 or xfs)"; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || skip "needs root (losetup, mount)"
[ -c /dev/fuse ] || skip "needs /dev/fuse"
[ -e /dev/loop-control ] || skip "needs loop devices (/dev/loop-control)"
for tool in nbdfuse losetup fsfreeze mount umount sha256sum "${tools[@]}"; do
    command -v "$tool" >/dev/null || skip "needs $tool (Debian: libnbd-bin, mount, e2fsprogs, xfsprogs, coreutils)"
done

work=$(mktemp -d /tmp/logpool-thesis.XXXXXX)
pool=$work/p.pool
loop="" server="" fuse_pid=""
log() { echo "thesis: $*"; }

detach() {
    if mountpoint -q "$work/mnt"; then umount "$work/mnt" || umount -l "$work/mnt"; fi
    if [ -n "$loop" ]; then losetup -d "$loop" || true; loop=""; fi
    if mountpoint -q "$work/fuse"; then umount "$work/fuse" || umount -l "$work/fuse"; fi
    if [ -n "$fuse_pid" ]; then wait "$fuse_pid" 2>/dev/null || true; fuse_pid=""; fi
}
stop_server() {
    if [ -n "$server" ]; then
        kill -TERM "$server"
        wait "$server" || { echo "logpool serve exited with $?"; cat "$work/serve.log"; return 1; }
        server=""
    fi
}
cleanup() {
    set +e
    detach
    [ -n "$server" ] && kill -TERM "$server" && wait "$server"
    rm -rf "$work"
}
trap cleanup EXIT

# serve EXPORT [ro]: serve the pool, attach EXPORT through nbdfuse and a loop device.
attach() {
    local export=$1 mode=${2:-rw}
    mkdir -p "$work/fuse" "$work/mnt"
    "$logpool" serve "$pool" --socket "$work/s.sock" 2>>"$work/serve.log" &
    server=$!
    for _ in $(seq 100); do [ -S "$work/s.sock" ] && break; sleep 0.05; done
    local ro=()
    [ "$mode" = ro ] && ro=(--readonly)
    nbdfuse "${ro[@]}" "$work/fuse" "nbd+unix:///$export?socket=$work/s.sock" &
    fuse_pid=$!
    for _ in $(seq 100); do [ -e "$work/fuse/nbd" ] && break; sleep 0.05; done
    [ -e "$work/fuse/nbd" ] || { echo "nbdfuse did not attach $export"; return 1; }
    if [ "$mode" = ro ]; then loop=$(losetup -r -f --show "$work/fuse/nbd"); else loop=$(losetup -f --show "$work/fuse/nbd"); fi
}

# check: the filesystem's read-only check of the attached device.
check() {
    if [ "$fs" = ext4 ]; then e2fsck -fn "$loop"; else xfs_repair -n "$loop"; fi
}

# An overcommitted pool, uncompressed (so random data fills it), a volume larger than the
# pool for the filesystem and a 16 MiB filler volume whose space is freed at the end. XFS
# needs at least 300 MiB and writes more metadata, so its pool and volume are larger.
if [ "$fs" = ext4 ]; then pool_size=96M disk_size=128M; else pool_size=160M disk_size=384M; fi
"$logpool" init "$pool" --size "$pool_size" --compression none >/dev/null
"$logpool" create "$pool" disk --size "$disk_size"
"$logpool" create "$pool" filler --size 16M
head -c 12M /dev/urandom | "$logpool" write "$pool" filler >/dev/null

log "mkfs.$fs on the served volume, then files and their checksums"
attach disk
if [ "$fs" = ext4 ]; then mkfs.ext4 -q -F "$loop"; else mkfs.xfs -q -f "$loop"; fi
mount "$loop" "$work/mnt"
mkdir "$work/mnt/keep"
for i in 1 2 3 4; do head -c 3M /dev/urandom >"$work/mnt/keep/f$i"; done
sync -f "$work/mnt/keep/f1"
(cd "$work/mnt/keep" && sha256sum f1 f2 f3 f4) >"$work/sums"

log "snapshot while mounted: fsfreeze, logpool snapshot through the server's control socket, thaw"
fsfreeze -f "$work/mnt"
"$logpool" snapshot "$pool" disk before || { fsfreeze -u "$work/mnt"; exit 1; }
fsfreeze -u "$work/mnt"
"$logpool" list "$pool"

log "keep writing until the pool refuses writes"
set +e
# conv=fsync: the error reaches dd even where the filesystem only learns of it at writeback.
dd if=/dev/urandom of="$work/mnt/big" bs=1M count=600 conv=fsync status=none 2>"$work/dd.err"
dd_status=$?
sync
set -e
cat "$work/dd.err"
[ "$dd_status" -ne 0 ] || { echo "dd into a full pool succeeded: the pool did not fill"; exit 1; }
detach
stop_server
grep -q "pool full" "$work/serve.log" || { echo "the server logged no pool-full refusal"; tail "$work/serve.log"; exit 1; }
log "the pool refused writes (server log: $(grep -c 'pool full' "$work/serve.log") pool-full refusals)"
"$logpool" verify "$pool"

if [ "$fs" = ext4 ]; then log "the snapshot, served read-only, passes e2fsck -fn and its files match"
else log "the snapshot, served read-only, mounts and its files match"; fi
attach before ro
if [ "$fs" = ext4 ]; then
    check
    mount -o ro,noload "$loop" "$work/mnt"
else
    # Read-only, on the full pool: the files as the freeze left them (norecovery: a
    # read-only device cannot replay a log); the full check follows once there is space.
    mount -o ro,norecovery "$loop" "$work/mnt"
fi
(cd "$work/mnt/keep" && sha256sum -c --quiet "$work/sums")
detach
stop_server

log "free space (destroy filler), then the full volume recovers and the old files read back"
"$logpool" destroy "$pool" filler
if [ "$fs" = xfs ]; then
    # A frozen XFS leaves records in its log that xfs_repair -n does not replay, so the
    # snapshot is checked as XFS users check one: a clone of it is mounted once (replaying
    # the log), then xfs_repair -n must pass; the snapshot itself stays read-only.
    log "a clone of the snapshot, its log replayed by a mount, passes xfs_repair -n"
    "$logpool" clone "$pool" before before-check
    attach before-check
    mount "$loop" "$work/mnt"
    umount "$work/mnt"
    check
    mount -o ro "$loop" "$work/mnt"
    (cd "$work/mnt/keep" && sha256sum -c --quiet "$work/sums")
    detach
    stop_server
    "$logpool" destroy "$pool" before-check
fi
attach disk
if [ "$fs" = ext4 ]; then
    set +e
    e2fsck -fy "$loop"
    fsck_status=$?
    set -e
    [ "$fsck_status" -le 1 ] || { echo "e2fsck -fy exited $fsck_status"; exit 1; }
else
    # XFS shut itself down at the first failed metadata write; mounting replays its log.
    mount "$loop" "$work/mnt"
    umount "$work/mnt"
fi
check
mount "$loop" "$work/mnt"
(cd "$work/mnt/keep" && sha256sum -c --quiet "$work/sums")
detach
stop_server
"$logpool" verify "$pool"
log "passed ($fs)"
