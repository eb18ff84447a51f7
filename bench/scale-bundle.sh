#!/usr/bin/env bash
# Pack `bench/bench.py --scale` with every program and library it runs, for a
# machine that has none of them: issue 10's many-core table is measured on a
# lent 16-core machine with no Debian packages and no network (the device
# tool), in one prepared call.
#
# usage: bench/scale-bundle.sh [-q QNBD] [-o DIR]
#   QNBD  the qnbd to measure (default build/qnbd; measure a Release build:
#         cmake -S . -B build-rel -DCMAKE_BUILD_TYPE=Release)
#   DIR   where the bundle goes (default build-scale: ignored by git, so
#         the device tool takes it only when its call names it in `carry`):
#         DIR/bundle.tar.gz (about 40 MB: the device tool carries at most
#         64 MiB with the tree) and DIR/run.sh
#
# The bundle holds the programs (qnbd, qemu-nbd, qemu-img, qemu-io, nbdkit
# with its file and null plugins and noextents filter, nbdcopy, nbdinfo, fio,
# taskset), every shared library they load, glibc's dynamic loader among
# them, and bench.py. Each program runs through that loader with the
# bundle's libraries only (bin/NAME is a wrapper), so neither the other
# machine's glibc nor its libraries matter. It needs /bin/sh, coreutils, tar
# with gzip, and python3 over there (bench.py uses only the standard
# library; checked with Debian 12's 3.11 in a chroot that held nothing else).
#
# There: sh DIR/run.sh [bench.py options], e.g. from the device tool:
#   run(command="sh build-scale/run.sh", carry=["build-scale"], timeout_s=540)
# It unpacks the bundle under $TMPDIR (else /tmp), prints the machine, then
# bench.py --scale's rows as they finish and its table (one repetition of
# 3 s per server and row: about 5 minutes); with $OUT set (the device tool)
# the log and JSON land there.
set -euo pipefail
cd "$(dirname "$0")/.."

qnbd=build/qnbd
out=build-scale
while getopts "q:o:" o; do
  case $o in
    q) qnbd=$OPTARG ;;
    o) out=$OPTARG ;;
    *) sed -n '7,13p' "$0" >&2; exit 2 ;;
  esac
done

plugins=/usr/lib/x86_64-linux-gnu/nbdkit
programs=(qemu-nbd qemu-img qemu-io nbdkit nbdcopy nbdinfo fio taskset)
for p in "${programs[@]}"; do
  command -v "$p" >/dev/null || { echo "scale-bundle: $p is not installed (bash .ci/setup)" >&2; exit 1; }
done
[[ -x $qnbd ]] || { echo "scale-bundle: no qnbd at $qnbd" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,exe,lib,nbdkit}

# The programs themselves; qnbd without its debug sections (a dev build's
# are most of its 100 MB).
objcopy --strip-debug "$qnbd" "$stage/exe/qnbd"
for p in "${programs[@]}"; do cp -L "$(command -v "$p")" "$stage/exe/$p"; done
cp "$plugins/plugins/nbdkit-file-plugin.so" "$plugins/plugins/nbdkit-null-plugin.so" \
   "$plugins/filters/nbdkit-noextents-filter.so" "$stage/nbdkit/"

# Every library any of them loads (ldd follows the whole closure), and the
# loader they name.
loader=
for f in "$stage"/exe/* "$stage"/nbdkit/*; do
  deps=$(ldd "$f")
  if grep -q "not found" <<<"$deps"; then
    echo "scale-bundle: $(basename "$f") needs a library this machine lacks:" >&2
    grep "not found" <<<"$deps" >&2
    exit 1
  fi
  while read -r lib; do
    cp -L -n "$lib" "$stage/lib/"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*ld-linux/ { print $1 }' <<<"$deps")
  interp=$(awk '$1 ~ /^\/.*ld-linux/ { print $1 }' <<<"$deps")
  [[ -n $interp ]] && loader=$(basename "$interp")
done
[[ -n $loader && -e $stage/lib/$loader ]] || { echo "scale-bundle: no dynamic loader found" >&2; exit 1; }

# bin/NAME runs exe/NAME through the bundle's loader and libraries. taskset
# and anything else that starts a program by name find these first on PATH.
for f in "$stage"/exe/*; do
  name=$(basename "$f")
  cat > "$stage/bin/$name" <<EOF
#!/bin/sh
d=\${0%/bin/*}
exec "\$d/lib/$loader" --library-path "\$d/lib" "\$d/exe/$name" "\$@"
EOF
  chmod +x "$stage/bin/$name"
done

cp bench/bench.py "$stage/"
tar -C "$stage" -czf "$out/bundle.tar.gz" .
cat > "$out/run.sh" <<'EOF'
#!/bin/sh
# bench.py --scale with the bundle's programs (made by bench/scale-bundle.sh).
here=$(cd "$(dirname "$0")" && pwd)
work=${TMPDIR:-/tmp}/qnbd-scale
d=$work/bundle
rm -rf "$work"
mkdir -p "$d"
tar -C "$d" -xzf "$here/bundle.tar.gz" || exit 1
PATH=$d/bin:$PATH
export PATH PYTHONUNBUFFERED=1
log=${OUT:-$here}/scale.txt
# A sandbox may refuse CPU affinity; then every row would fail to start.
pin=
taskset -c 0 true 2>/dev/null || pin=--no-pin
{
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "# kernel $(uname -r), $(awk '/MemTotal/ { printf "%d GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "# $("$d/bin/qnbd" --version 2>&1 | head -1); $("$d/bin/qemu-nbd" --version | head -1); $("$d/bin/nbdkit" --version); $("$d/bin/fio" --version)"
  [ -n "$pin" ] && echo "# taskset cannot pin here: servers and clients share every CPU"
  python3 "$d/bench.py" --scale --qnbd "$d/bin/qnbd" --nbdkit-plugin-dir "$d/nbdkit" \
    --workdir "$work/images" --shmdir "$work/shm" --reps 1 --runtime 3 --json "${OUT:-$here}/scale.json" $pin "$@" 2>&1
  echo "# exit $?"
} | tee "$log"
rm -rf "$work"
EOF
chmod +x "$out/run.sh"

# What would travel: the device tool carries at most 64 MiB with the tree.
du -sh "$out"
