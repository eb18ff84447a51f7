#!/usr/bin/env bash
# qnbd serve --config: several exports and the listener from a JSON file,
# listed in file order with descriptions and contexts (allocation_depth),
# each served with its own read-only setting (read through one, written
# through the other), its limits used unless the command line gives them
# (threads, poll_max_ns); a config without exports is refused before
# anything listens, naming the key.
source "$(dirname "$0")/lib-serve.sh"
requires nbdinfo nbdcopy python3 cmp

head -c 2M /dev/urandom >"$TMPDIR_TEST/a.img"
head -c 3M /dev/urandom >"$TMPDIR_TEST/b.img"
cat >"$TMPDIR_TEST/qnbd.json" <<JSON
{
  "exports": [
    { "name": "alpha", "image": "a.img", "format": "raw", "description": "first" },
    { "name": "beta", "image": "b.img", "format": "raw", "read_only": true, "allocation_depth": true }
  ],
  "listeners": [ { "type": "unix", "path": "$TMPDIR_TEST/cfg.sock" } ],
  "limits": { "threads": 3, "poll_max_ns": 0 }
}
JSON

# Listener and limits from the file.
"$QNBD" serve -v --config "$TMPDIR_TEST/qnbd.json" --pid-file "$TMPDIR_TEST/cfg.pid" 2>"$TMPDIR_TEST/cfg.log" &
cpid=$!
cleanup_fn "kill -9 $cpid 2>/dev/null"
wait_ready -s "$TMPDIR_TEST/cfg.pid" $cpid || true
[[ -s $TMPDIR_TEST/cfg.pid ]] || { cat "$TMPDIR_TEST/cfg.log"; fail "config server did not start"; }
nbdinfo --list --json "nbd+unix:///?socket=$TMPDIR_TEST/cfg.sock" >"$TMPDIR_TEST/list.json"
python3 - "$TMPDIR_TEST/list.json" <<'PY' || fail "export list"
import json, sys
d = json.load(open(sys.argv[1]))
ex = [(e["export-name"], e.get("description"), e["is_read_only"], e["export-size"]) for e in d["exports"]]
assert ex == [("alpha", "first", False, 2 << 20), ("beta", None, True, 3 << 20)], ex
ctx = d["exports"][1]["contexts"]
assert ctx == ["base:allocation", "qemu:allocation-depth"], ctx
PY
nbdcopy "nbd+unix:///beta?socket=$TMPDIR_TEST/cfg.sock" "$TMPDIR_TEST/b.copy"
cmp "$TMPDIR_TEST/b.img" "$TMPDIR_TEST/b.copy" || fail "beta differs"
head -c 2M /dev/urandom >"$TMPDIR_TEST/a.new"
nbdcopy "$TMPDIR_TEST/a.new" "nbd+unix:///alpha?socket=$TMPDIR_TEST/cfg.sock"
kill -TERM $cpid
wait $cpid || fail "config server exit status $?"
cmp "$TMPDIR_TEST/a.new" "$TMPDIR_TEST/a.img" || fail "alpha not written"
grep -q "3 io threads, polling up to 0 ns" "$TMPDIR_TEST/cfg.log" ||
  fail "the file's limits (threads 3, poll_max_ns 0) were not used: $(cat "$TMPDIR_TEST/cfg.log")"

# The command line's --threads and --poll-max-ns win over the file's.
"$QNBD" serve -v --config "$TMPDIR_TEST/qnbd.json" --threads 2 --poll-max-ns 5000 \
  --pid-file "$TMPDIR_TEST/cfg2.pid" 2>"$TMPDIR_TEST/cfg2.log" &
cpid=$!
cleanup_fn "kill -9 $cpid 2>/dev/null"
wait_ready -s "$TMPDIR_TEST/cfg2.pid" $cpid || true
[[ -s $TMPDIR_TEST/cfg2.pid ]] || { cat "$TMPDIR_TEST/cfg2.log"; fail "config server did not start"; }
kill -TERM $cpid
wait $cpid || fail "config server exit status $?"
grep -q "2 io threads, polling up to 5000 ns" "$TMPDIR_TEST/cfg2.log" ||
  fail "--threads 2 --poll-max-ns 5000 did not override the file: $(cat "$TMPDIR_TEST/cfg2.log")"

# A bad config is refused before anything listens.
echo '{"exports": []}' >"$TMPDIR_TEST/bad.json"
if "$QNBD" serve --config "$TMPDIR_TEST/bad.json" 2>"$TMPDIR_TEST/bad.log"; then fail "empty config accepted"; fi
grep -q exports "$TMPDIR_TEST/bad.log" || fail "config error does not name the key"
echo PASS
