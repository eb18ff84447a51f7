#!/usr/bin/env bash
# json:{...} images and --image-opts, beside qemu-nbd. oVirt imageio starts
# qemu-nbd with a json: filename every time (the format, "backing": null to
# serve one layer alone, a raw node with offset/size to serve a range of a
# file); a tool that swaps in qnbd must get the same disk.
# 1. A range of a raw file (offset and size): the same size, bytes, map and
#    writes as qemu-nbd, and nothing outside the range changes.
# 2. --image-opts with a size suffix; a qcow2 image stored 1 MiB into a raw
#    file: the same guest data before and after writes that grow it, the
#    prefix untouched, a clean qemu-img check.
# 3. The same qcow2 in a fixed-size range with no room to allocate: both
#    answer ENOSPC and leave the file byte for byte as it was (the engine
#    gives the clusters it allocated back).
# 4. "backing": null: the backing file's data reads as zeroes, with the same
#    base:allocation and qemu:allocation-depth maps as qemu-nbd's, and
#    differs from the same image served with its chain.
#    -s over both (writes to a temporary overlay) reads as qemu-nbd -s.
# 5. imageio's command line (--shared=8, --cache=none --aio=native where
#    the host allows O_DIRECT, --discard=unmap --detect-zeroes=unmap,
#    --allocation-depth, --bitmap) serves the same dirty bitmap.
# 6. What neither opens is refused by both, qnbd with one line.
# 7. A config file's json: image with a relative file name is opened next
#    to the config, and a bad one is refused at load.
# 8. Run through a link named qemu-nbd, qnbd is `qnbd serve` and prints a
#    version imageio parses as qemu-nbd 5.2 or later (so it passes
#    --allocation-depth), naming qnbd.
source "$(dirname "$0")/lib-serve.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy python3
requires_qnbd
requires_python_nbd

T=$TMPDIR_TEST
URI="nbd+unix:///?socket=$T/s.sock"

head -c 8M /dev/urandom >"$T/r.raw"

echo "== 1. a range of a raw file"
for tool in qemu-nbd qnbd; do
  cp "$T/r.raw" "$T/r-$tool.raw"
  start_tool "$tool" "json:{\"driver\": \"raw\", \"file\": {\"driver\": \"file\", \"filename\": \"$T/r-$tool.raw\"},
                        \"offset\": 1048576, \"size\": 4194304}"
  expect_eq "$(nbdinfo --size "$URI")" 4194304 "$tool size"
  nbdcopy "$URI" "$T/out-$tool.bin"
  nbdinfo --map "$URI" >"$T/map1-$tool.txt"
  w1=$(pwrite_at "$URI" 0 65536 0xa1)
  w2=$(pwrite_at "$URI" $((4194304 - 65536)) 65536 0xa2)
  expect_eq "$w1 $w2" "ok ok" "$tool writes inside the range"
  stop_server "$SERVER_PID"
done
cmp <(tail -c +$((1048576 + 1)) "$T/r.raw" | head -c 4194304) "$T/out-qnbd.bin" || fail "qnbd served other bytes than the range"
cmp "$T/out-qemu-nbd.bin" "$T/out-qnbd.bin" || fail "the range's bytes differ from qemu-nbd's"
cmp "$T/map1-qemu-nbd.txt" "$T/map1-qnbd.txt" || fail "the range's map differs from qemu-nbd's"
cmp "$T/r-qemu-nbd.raw" "$T/r-qnbd.raw" || fail "the file after the writes differs from qemu-nbd's"
cmp -n 1048576 "$T/r.raw" "$T/r-qnbd.raw" || fail "qnbd wrote before the range"
cmp <(tail -c +$((5242880 + 1)) "$T/r.raw") <(tail -c +$((5242880 + 1)) "$T/r-qnbd.raw") ||
  fail "qnbd wrote after the range"
cmp -s "$T/r.raw" "$T/r-qnbd.raw" && fail "the writes inside the range did not reach the file"

echo "== 2. --image-opts, and a qcow2 image inside a raw file"
for tool in qemu-nbd qnbd; do
  start_tool "$tool" --image-opts "driver=raw,file.driver=file,file.filename=$T/r.raw,offset=1M" -r
  expect_eq "$(nbdinfo --size "$URI")" 7340032 "$tool --image-opts size"
  stop_server "$SERVER_PID"
done
qemu-img create -q -f qcow2 "$T/q.qcow2" 4M
qemu-io -f qcow2 -c "write -P 0x44 1M 64k" "$T/q.qcow2" >/dev/null
head -c 1M /dev/urandom >"$T/prefix.bin"
cat "$T/prefix.bin" "$T/q.qcow2" >"$T/emb.raw"
qsize=$(stat -c %s "$T/q.qcow2")
emb_spec() { # emb_spec FILE [SIZE]
  local size=${2:+, \"size\": $2}
  echo "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"raw\", \"offset\": 1048576$size,
         \"file\": {\"driver\": \"file\", \"filename\": \"$1\"}}}"
}
qemu-img convert -O raw "$T/q.qcow2" "$T/q.bin"
for tool in qemu-nbd qnbd; do
  cp "$T/emb.raw" "$T/emb-$tool.raw"
  start_tool "$tool" "$(emb_spec "$T/emb-$tool.raw")"
  nbdcopy "$URI" "$T/emb-out-$tool.bin"
  cmp "$T/q.bin" "$T/emb-out-$tool.bin" || fail "$tool: the embedded qcow2 reads other data"
  expect_eq "$(pwrite_at "$URI" $((2 << 20)) 131072 0x55)" ok "$tool write growing the embedded image"
  stop_server "$SERVER_PID"
  cmp -n 1048576 "$T/prefix.bin" "$T/emb-$tool.raw" || fail "$tool changed the bytes before the embedded image"
  qemu-img check -q "$(emb_spec "$T/emb-$tool.raw")" || fail "$tool left the embedded image inconsistent"
  qemu-img convert -O raw "$(emb_spec "$T/emb-$tool.raw")" "$T/emb-after-$tool.bin"
done
cmp "$T/emb-after-qemu-nbd.bin" "$T/emb-after-qnbd.bin" || fail "the embedded image's data differs from qemu-nbd's"
cmp -s "$T/q.bin" "$T/emb-after-qnbd.bin" && fail "the write did not reach the embedded image"

echo "== 3. no room in a fixed-size range: ENOSPC, the file unchanged"
for tool in qemu-nbd qnbd; do
  cp "$T/emb.raw" "$T/fix-$tool.raw"
  start_tool "$tool" "$(emb_spec "$T/fix-$tool.raw" "$qsize")"
  expect_eq "$(pwrite_at "$URI" $((3 << 20)) 65536 0x66)" ENOSPC "$tool write needing a new cluster"
  stop_server "$SERVER_PID"
  cmp "$T/emb.raw" "$T/fix-$tool.raw" || fail "$tool changed the file after refusing the write"
done

echo "== 4. \"backing\": null"
qemu-img create -q -f qcow2 "$T/base.qcow2" 4M
qemu-io -f qcow2 -c "write -P 0x22 0 1M" "$T/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b "$T/base.qcow2" -F qcow2 "$T/top.qcow2" 4M
qemu-io -f qcow2 -c "write -P 0x33 2M 1M" "$T/top.qcow2" >/dev/null
null_spec="json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"$T/top.qcow2\"}, \"backing\": null}"
for tool in qemu-nbd qnbd; do
  start_tool "$tool" -r -A "$null_spec"
  nbdcopy "$URI" "$T/null-$tool.bin"
  nbdinfo --map "$URI" >"$T/null-map-$tool.txt"
  nbdinfo --map=qemu:allocation-depth "$URI" >"$T/null-depth-$tool.txt"
  stop_server "$SERVER_PID"
done
cmp "$T/null-qemu-nbd.bin" "$T/null-qnbd.bin" || fail "backing null: data differs from qemu-nbd's"
cmp "$T/null-map-qemu-nbd.txt" "$T/null-map-qnbd.txt" || fail "backing null: base:allocation differs"
cmp "$T/null-depth-qemu-nbd.txt" "$T/null-depth-qnbd.txt" || fail "backing null: allocation depth differs"
cmp -n 1048576 "$T/null-qnbd.bin" /dev/zero || fail "backing null: the backing file's data shows through"
start_tool qnbd -r -A "$T/top.qcow2"
nbdcopy "$URI" "$T/chain.bin"
nbdinfo --map=qemu:allocation-depth "$URI" >"$T/chain-depth.txt"
stop_server "$SERVER_PID"
cmp -s "$T/chain.bin" "$T/null-qnbd.bin" && fail "the image reads the same with and without its backing chain"
cmp -s "$T/chain-depth.txt" "$T/null-depth-qnbd.txt" && fail "allocation depth ignores backing null"

echo "== 4b. -s over a range and over \"backing\": null"
for tool in qemu-nbd qnbd; do
  cp "$T/r.raw" "$T/s-$tool.raw"
  start_tool "$tool" -s "json:{\"driver\": \"raw\", \"file.filename\": \"$T/s-$tool.raw\", \"offset\": \"1M\", \"size\": \"2M\"}"
  expect_eq "$(pwrite_at "$URI" 65536 65536 0xb1)" ok "$tool -s write"
  nbdcopy "$URI" "$T/s-out-$tool.bin"
  stop_server "$SERVER_PID"
  cmp "$T/r.raw" "$T/s-$tool.raw" || fail "$tool -s wrote to the image"
  start_tool "$tool" -s "$null_spec"
  nbdcopy "$URI" "$T/s-null-$tool.bin"
  stop_server "$SERVER_PID"
done
cmp "$T/s-out-qemu-nbd.bin" "$T/s-out-qnbd.bin" || fail "-s over a range: data differs from qemu-nbd's"
cmp -s <(tail -c +$((1048576 + 1)) "$T/r.raw" | head -c 2097152) "$T/s-out-qnbd.bin" && fail "-s: the write is not seen"
cmp "$T/s-null-qemu-nbd.bin" "$T/s-null-qnbd.bin" || fail "-s over backing null: data differs from qemu-nbd's"
cmp "$T/null-qnbd.bin" "$T/s-null-qnbd.bin" || fail "-s over backing null: other data than without -s"

echo "== 5. imageio's command line"
qemu-img create -q -f qcow2 "$T/bm.qcow2" 8M
qemu-img bitmap --add "$T/bm.qcow2" b
qemu-io -f qcow2 -c "write -P 0x77 1M 128k" -c "write -P 0x78 5M 64k" "$T/bm.qcow2" >/dev/null
io_flags=(--cache=none --aio=native)
qemu-nbd -t -k "$T/probe.sock" --pid-file "$T/probe.pid" "${io_flags[@]}" -f qcow2 "$T/bm.qcow2" 2>/dev/null &
probe=$!
if wait_ready -s "$T/probe.pid" "$probe"; then
  kill -TERM "$probe"
else
  echo "note: this host refuses O_DIRECT/native AIO here; imageio's I/O flags left out"
  io_flags=()
fi
wait "$probe" 2>/dev/null || true
for tool in qemu-nbd qnbd; do
  cp "$T/bm.qcow2" "$T/bm-$tool.qcow2"
  start_tool "$tool" --export-name= --persistent --shared=8 "${io_flags[@]}" --discard=unmap \
    --detect-zeroes=unmap --allocation-depth --bitmap=b \
    "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"$T/bm-$tool.qcow2\"}}"
  nbdinfo --map=qemu:dirty-bitmap:b "$URI" >"$T/bm-map-$tool.txt"
  nbdinfo --map=qemu:allocation-depth "$URI" >"$T/bm-depth-$tool.txt"
  stop_server "$SERVER_PID"
done
grep -q dirty "$T/bm-map-qnbd.txt" || fail "imageio: no dirty extent in the bitmap map"
cmp "$T/bm-map-qemu-nbd.txt" "$T/bm-map-qnbd.txt" || fail "imageio: the dirty bitmap differs from qemu-nbd's"
cmp "$T/bm-depth-qemu-nbd.txt" "$T/bm-depth-qnbd.txt" || fail "imageio: allocation depth differs"

echo "== 6. refusals"
refused_by_both 'A block device must be specified for "file"' 'json:{"driver": "qcow2"}'
refused_by_both "doesn't support the option 'bogus'" "json:{\"driver\": \"qcow2\", \"file.filename\": \"$T/q.qcow2\", \"bogus\": 1}"
refused_by_both "Cannot find device='$T/q.qcow2'" "json:{\"driver\": \"qcow2\", \"file\": \"$T/q.qcow2\"}"
refused_by_both "Could not parse the JSON options" "json:{\"driver\": \"qcow2\""
refused_by_both "Specified size is not multiple of 512" "json:{\"driver\": \"raw\", \"file.filename\": \"$T/r.raw\", \"size\": 1000}"
refused_by_both "cannot be greater than size of the containing file" \
  "json:{\"driver\": \"raw\", \"file.filename\": \"$T/r.raw\", \"offset\": 20971520}"
refused_by_both "has to be smaller or equal to the" \
  "json:{\"driver\": \"raw\", \"file.filename\": \"$T/r.raw\", \"offset\": 7340032, \"size\": 2097152}"
refused_by_both "Cannot find device='null'" --image-opts "driver=qcow2,file.filename=$T/top.qcow2,backing=null"
refused_by_both "--image-opts and -f are mutually exclusive" --image-opts -f qcow2 "driver=qcow2,file.filename=$T/q.qcow2"
refused_by_both "No such file" "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"$T/nonexistent\"}}"

echo "== 7. a config file's json: image"
mkdir -p "$T/cfg"
head -c 4M /dev/urandom >"$T/cfg/d.raw"
cat >"$T/cfg/c.json" <<'EOF'
{"exports": [{"name": "", "read_only": true,
  "image": "json:{\"driver\": \"raw\", \"file\": {\"driver\": \"file\", \"filename\": \"d.raw\"}, \"offset\": \"1M\", \"size\": \"2M\"}"}]}
EOF
(cd / && start_serve --config "$T/cfg/c.json" && expect_eq "$(nbdinfo --size "$SERVE_URI")" 2097152 "config json: size" &&
  nbdcopy "$SERVE_URI" "$T/cfg-out.bin" && stop_serve) || fail "config json: image"
cmp <(tail -c +$((1048576 + 1)) "$T/cfg/d.raw" | head -c 2097152) "$T/cfg-out.bin" || fail "config json: other bytes"
echo '{"exports": [{"name": "", "image": "json:{\"driver\": \"qcow2\"}"}]}' >"$T/cfg/bad.json"
if "$QNBD" serve --config "$T/cfg/bad.json" 2>"$T/cfg.err"; then fail "a bad json: image in a config was accepted"; fi
grep -q '/exports/0/image' "$T/cfg.err" || { cat "$T/cfg.err" >&2; fail "config json: error without its pointer"; }

echo "== 8. run as qemu-nbd (a link named qemu-nbd, as QEMU_NBD= points imageio at it)"
mkdir -p "$T/bin"
ln -s "$QNBD" "$T/bin/qemu-nbd"
version=$("$T/bin/qemu-nbd" --version)
# imageio's qemu_nbd.version(): the second word of the first line, as ints;
# 5.2 or later makes it pass --allocation-depth and allow "backing": null.
"$PY" -c 'import sys
v = tuple(int(n) for n in sys.argv[1].splitlines()[0].split(None, 2)[1].split("."))
assert v >= (5, 2, 0), v' "$version" || fail "imageio would not take '$version' for qemu-nbd 5.2 or later"
[[ $version == *qnbd* ]] || fail "the qemu-nbd version line does not say it is qnbd: $version"
start_server "$T/l.pid" "$T/bin/qemu-nbd" -t -k "$T/l.sock" --pid-file "$T/l.pid" --export-name= --shared=8 \
  --allocation-depth -r "$null_spec" || fail "qnbd as qemu-nbd did not start"
nbdinfo --map=qemu:allocation-depth "nbd+unix:///?socket=$T/l.sock" >"$T/link-depth.txt"
stop_server "$SERVER_PID"
cmp "$T/null-depth-qemu-nbd.txt" "$T/link-depth.txt" || fail "qnbd as qemu-nbd serves another allocation depth"

echo PASS
