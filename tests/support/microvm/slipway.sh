# Helpers for the microVM guest's /init and the test's guest script (sourced).
# Everything the host parses is a console line `@slipway KEY [WORDS…]`.

# mark KEY [WORDS…]: one line for the host.
mark() { echo "@slipway $*"; }

# now_ms: milliseconds since boot (10 ms resolution, /proc/uptime).
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# timed KEY CMD…: run CMD, then `mark KEY exit=N ms=T` (its stderr's last
# line follows as err=… when it failed).
timed() {
  key="$1"; shift
  t0=$(now_ms)
  "$@" 2>/tmp/timed.err
  rc=$?
  t1=$(now_ms)
  if [ $rc -eq 0 ]; then
    mark "$key" "exit=0" "ms=$((t1 - t0))"
  else
    mark "$key" "exit=$rc" "ms=$((t1 - t0))" "err=$(tail -n1 /tmp/timed.err | tr ' ' _)"
  fi
  return $rc
}
