#!/usr/bin/env bash
# qnbd check vs qemu-img check on 250 randomly damaged images (fixed seeds;
# integration/check_differential.py says what is damaged and how): the
# same exit status and the same output, line for line; and on 200 more,
# `check -r all` and `-r leaks` judged by qemu-img check afterwards. It found the
# divergences fixed with it (L1 entries with reserved bits or a zero offset
# field, refcount table entries with reserved bits, refcount overflow,
# extended-L2 bitmap checks, COPIED flags in unaligned L2 tables, snapshot
# names printed as C strings).
set -u
for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool missing"; exit 77; }
done
QNBD=${QNBD:?QNBD must point at the qnbd binary}
[ -x "$QNBD" ] || { echo "SKIP: $QNBD not built"; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for seed in 1 2; do
  python3 "$here/check_differential.py" "$(realpath "$QNBD")" "$tmp/w$seed" 125 "$seed" || status=1
done
# Repairs: qemu-img check judges each tool's result (no worse than
# qemu-img's repair, exit 0 only when clean).
python3 "$here/check_differential.py" "$(realpath "$QNBD")" "$tmp/wa" 100 3 all || status=1
python3 "$here/check_differential.py" "$(realpath "$QNBD")" "$tmp/wl" 100 4 leaks || status=1
exit $status
