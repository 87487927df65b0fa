#!/usr/bin/env bash
# NBD benchmark (issue 10): the same fio --ioengine=nbd jobs against `logpool serve`,
# `qemu-nbd -f qcow2` and `nbdkit file`, in one run, and raw export/import against
# `qemu-img convert`, printed as a table of ratios (these machines are shared and noisy:
# compare within a run, not across runs).
#
# Usage: scripts/bench-nbd.sh [DIR] [SECONDS-PER-JOB]
#   DIR: where the images go (default /tmp; needs ~6 GiB free), SECONDS: fio runtime (default 8).
# Needs fio, qemu-utils, nbdkit, python3 (scripts/setup.sh installs all but python3).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp}
seconds=${2:-8}
for tool in fio qemu-img qemu-nbd nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "bench-nbd: needs $tool" >&2; exit 1; }
done
swift build -c release --product logpool >/dev/null
logpool=$PWD/.build/release/logpool

work=$(mktemp -d "$dir/logpool-bench-nbd.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

size=1G
# Each target: how to start it (sets url), and how to stop it.
start_logpool() {
    "$logpool" serve "$work/p.pool" --socket "$work/lp.sock" 2>>"$work/serve.log" &
    pids+=($!); lp_pid=$!
    for _ in $(seq 100); do [ -S "$work/lp.sock" ] && break; sleep 0.05; done
    url="nbd+unix:///disk?socket=$work/lp.sock"
}
stop_logpool() { kill -TERM "$lp_pid"; wait "$lp_pid"; }
start_qemu() {
    qemu-nbd -k "$work/q.sock" -f qcow2 -t "$work/q.qcow2" &
    pids+=($!); q_pid=$!
    for _ in $(seq 100); do [ -S "$work/q.sock" ] && break; sleep 0.05; done
    url="nbd+unix:///?socket=$work/q.sock"
}
stop_qemu() { kill -TERM "$q_pid"; wait "$q_pid" 2>/dev/null || true; rm -f "$work/q.sock"; }
start_nbdkit() {
    nbdkit -f -U "$work/k.sock" file "$work/k.raw" &
    pids+=($!); k_pid=$!
    for _ in $(seq 100); do [ -S "$work/k.sock" ] && break; sleep 0.05; done
    url="nbd+unix:///?socket=$work/k.sock"
}
stop_nbdkit() { kill -TERM "$k_pid"; wait "$k_pid" 2>/dev/null || true; rm -f "$work/k.sock"; }

# fio JOB-ARGS... -> prints "iops bw_bytes_per_s" of the job's write or read side.
fio_run() {
    local side=$1; shift
    fio --name=j --ioengine=nbd --uri="$url" --output-format=json --output="$work/fio.json" "$@" >/dev/null 2>&1
    python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]['$side']; print(j['iops'], j['bw_bytes'])" "$work/fio.json"
}

jobs() {
    # 1-2: 4 KiB random writes over the whole volume, fsync every 32.
    randw1=$(fio_run write --rw=randwrite --bs=4k --iodepth=1 --fsync=32 --size=$size --time_based --runtime="$seconds" --randrepeat=0)
    randw16=$(fio_run write --rw=randwrite --bs=4k --iodepth=16 --fsync=32 --size=$size --time_based --runtime="$seconds" --randrepeat=0)
    # 3: 1 MiB sequential writes of the first 512 MiB at QD4, flush at the end.
    seqw=$(fio_run write --rw=write --bs=1M --iodepth=4 --size=512M --end_fsync=1)
    # 4: 4 KiB random reads at QD16 on that written data.
    randr16=$(fio_run read --rw=randread --bs=4k --iodepth=16 --size=512M --time_based --runtime="$seconds" --randrepeat=0)
}
first_write_after_snapshot() {
    fio_run write --rw=randwrite --bs=4k --iodepth=16 --fsync=32 --size=512M --time_based --runtime="$seconds" --randrepeat=0
}

echo "bench-nbd: logpool serve" >&2
"$logpool" init "$work/p.pool" --size 4G --compression none >/dev/null
"$logpool" create "$work/p.pool" disk --size $size
start_logpool; jobs
lp=("$randw1" "$randw16" "$seqw" "$randr16")
"$logpool" snapshot "$work/p.pool" disk before >/dev/null   # through the control socket
lp_snap=$(first_write_after_snapshot)
stop_logpool

echo "bench-nbd: qemu-nbd -f qcow2" >&2
qemu-img create -q -f qcow2 "$work/q.qcow2" $size
start_qemu; jobs
q=("$randw1" "$randw16" "$seqw" "$randr16")
stop_qemu
qemu-img snapshot -c before "$work/q.qcow2"
start_qemu
q_snap=$(first_write_after_snapshot)
stop_qemu

echo "bench-nbd: nbdkit file" >&2
truncate -s $size "$work/k.raw"
start_nbdkit; jobs
k=("$randw1" "$randw16" "$seqw" "$randr16")
stop_nbdkit

# Export and import of a 2 GiB volume, half allocated (1 MiB of data every 2 MiB), against
# qemu-img convert raw -> qcow2 (import) and qcow2 -> raw (export).
echo "bench-nbd: export/import, 2 GiB half allocated" >&2
python3 - "$work/half.raw" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(2 << 30)
    for i in range(0, 2 << 30, 2 << 20):
        f.seek(i)
        f.write(os.urandom(1 << 20))
EOF
sync
now() { date +%s.%N; }
t0=$(now); "$logpool" import "$work/p.pool" "$work/half.raw" half; t1=$(now)
"$logpool" export "$work/p.pool" half "$work/half-out.raw"; t2=$(now)
qemu-img convert -f raw -O qcow2 "$work/half.raw" "$work/half.qcow2"; sync; t3=$(now)
qemu-img convert -f qcow2 -O raw "$work/half.qcow2" "$work/half-q.raw"; sync; t4=$(now)
cmp "$work/half.raw" "$work/half-out.raw" || { echo "bench-nbd: export differs from the imported file" >&2; exit 1; }

python3 - "$seconds" "${lp[@]}" "$lp_snap" "${q[@]}" "$q_snap" "${k[@]}" "$t0" "$t1" "$t2" "$t3" "$t4" <<'EOF'
import sys
a = sys.argv[2:]
def pair(s): i, b = s.split(); return float(i), float(b)
lp = [pair(x) for x in a[0:5]]; q = [pair(x) for x in a[5:10]]; k = [pair(x) for x in a[10:14]] + [None]
t = [float(x) for x in a[14:19]]
imp, exp, qimp, qexp = t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3]
rows = [
    ("4K randwrite QD1 fsync/32", "IOPS", 0, 0, "-"),
    ("4K randwrite QD16 fsync/32", "IOPS", 1, 0, ">= 1.5x qemu, >= 0.9x nbdkit"),
    ("1M seqwrite QD4 + flush", "MB/s", 2, 1, ">= 1.0x nbdkit"),
    ("4K randread QD16", "IOPS", 3, 0, ">= 0.8x nbdkit"),
    ("4K randwrite after snapshot", "IOPS", 4, 0, ">= 10x qemu"),
]
def fmt(v): return f"{v:.1f}" if v < 1e4 else f"{v:.0f}"
out = [("ROW", "UNIT", "LOGPOOL", "QEMU-NBD+QCOW2", "NBDKIT-FILE", "VS-QEMU", "VS-NBDKIT", "TARGET")]
for name, unit, i, field, target in rows:
    scale = 1e-6 if field == 1 else 1
    l = lp[i][field] * scale; qq = q[i][field] * scale
    kk = k[i][field] * scale if k[i] else None
    out.append((name, unit, fmt(l), fmt(qq), fmt(kk) if kk else "-", f"{l/qq:.2f}", f"{l/kk:.2f}" if kk else "-", target))
out.append(("import 2G half-allocated", "s", f"{imp:.2f}", f"{qimp:.2f}", "-", f"{qimp/imp:.2f}", "-", ">= 1.0x qemu-img (speed)"))
out.append(("export 2G half-allocated", "s", f"{exp:.2f}", f"{qexp:.2f}", "-", f"{qexp/exp:.2f}", "-", ">= 1.0x qemu-img (speed)"))
w = [max(len(r[c]) for r in out) for c in range(len(out[0]))]
for r in out:
    print("  ".join(r[c].ljust(w[c]) if c == 0 else r[c].rjust(w[c]) for c in range(len(r))))
print(f"(fio jobs {sys.argv[1]} s each; VS-* are speed ratios, logpool / other, time ratios other / logpool)")
EOF
