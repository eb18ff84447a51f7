#!/usr/bin/env bash
# NBD_CMD_CACHE (proto.md "Request types": a hint to bring the range into a
# cache; the server may ignore it), through libnbd, against qemu-nbd 7.2:
# raw and qcow2 (with a backing file), writable and read-only (-r). Each
# case sends a CACHE of one cluster, of the whole image, of a range that
# ends at the end of the image, and of a range past the end. Both servers
# must give the same answers, with one deliberate exception: on a
# read-only qcow2, qemu-nbd 7.2 answers CACHE with EPERM (its prefetch is
# a copy-on-read, which needs write permission, and it then reports
# "Failed to flush the refcount block cache" at exit); qnbd serves it, as
# on every other export (docs/architecture.md "Deliberate differences").
# qnbd's CACHE changes nothing: the image files are byte-identical after it.
source "$(dirname "$0")/functions.sh"
requires_qnbd
requires_python_nbd
requires qemu-img qemu-io qemu-nbd

d=$TMPDIR_TEST
qemu-img create -q -f raw "$d/base.raw" 4M
qemu-io -f raw -c "write -q -P 0x11 0 4M" "$d/base.raw" >/dev/null || fail "qemu-io base"
qemu-img create -q -f qcow2 -b "$d/base.raw" -F raw "$d/top.qcow2" 4M
qemu-io -f qcow2 -c "write -q -P 0x22 1M 64k" "$d/top.qcow2" >/dev/null || fail "qemu-io top"
cp "$d/base.raw" "$d/plain.raw"

# probe URI: one line per CACHE request, "ok" or "Error" and the errno name.
probe() {
  "$PY" - "$1" <<'PY'
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
print("can_cache", h.can_cache())
for name, off, count in (("one cluster", 65536, 65536), ("whole image", 0, size),
                         ("to the end", size - 4096, 4096), ("past the end", size - 4096, 8192)):
    try:
        h.cache(count, off)
        print(name, "ok")
    except nbd.Error as e:
        print(name, nbd.Error.__name__, e.errno)
h.shutdown()
PY
}

# serve TOOL FLAGS FORMAT FILE: start it, probe, stop; prints probe's lines.
serve() {
  local tool=$1 flags=$2 format=$3 file=$4 sock=$d/s.sock pid=$d/s.pid
  local cmd=(qemu-nbd)
  [ "$tool" = qnbd ] && cmd=("$QNBD" serve)
  # shellcheck disable=SC2086 # flags is a word list
  start_server "$pid" "${cmd[@]}" -t $flags -f "$format" -k "$sock" --pid-file "$pid" "$file" ||
    fail "$tool $flags $format did not start"
  probe "nbd+unix:///?socket=$sock" || fail "$tool $flags $format: probe failed"
  stop_server "$SERVER_PID" || fail "$tool $flags $format did not stop cleanly"
}

for flags in "" "-r"; do
  for image in "raw plain.raw" "qcow2 top.qcow2"; do
    read -r format file <<<"$image"
    what="CACHE on ${flags:-rw} $format"
    cp "$d/$file" "$d/saved"
    sha_before=$(sha256sum "$d/$file" "$d/base.raw" | cut -c1-64)
    ours=$(serve qnbd "$flags" "$format" "$d/$file")
    expect_eq "$(sha256sum "$d/$file" "$d/base.raw" | cut -c1-64)" "$sha_before" "$what: image files after CACHE"
    theirs=$(serve qemu "$flags" "$format" "$d/$file")
    # (qemu-nbd's CACHE on a writable qcow2 copies backing data up into the
    # image, which CACHE allows; the next case starts from the same files.)
    cp "$d/saved" "$d/$file"
    echo "$what: qnbd [$(tr '\n' ' ' <<<"$ours")] qemu-nbd [$(tr '\n' ' ' <<<"$theirs")]"
    if [ "$flags $format" = "-r qcow2" ]; then
      # qemu-nbd's EPERM (see the top of this file), and qnbd's answers.
      grep -q 'one cluster Error EPERM$' <<<"$theirs" || fail "$what: qemu-nbd no longer answers EPERM; update this test"
      expect_eq "$ours" "can_cache True
one cluster ok
whole image ok
to the end ok
past the end Error EINVAL" "$what (qnbd)"
    else
      expect_eq "$ours" "$theirs" "$what"
      grep -q 'one cluster ok' <<<"$ours" || fail "$what: CACHE of one cluster refused"
    fi
  done
done
echo "PASS: $0"
