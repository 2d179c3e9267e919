# The benchmark's guest script: sourced by the microVM guest's /init (see
# tests/support/microvm/init) after DHCP, with `mark` and `now_ms` from
# /lib/slipway.sh. Parameters come on the kernel command line
# (bench.t= bench.iperf= bench.echo= bench.rrn= bench.crr=). Every result is
# a console line: `@slipway begin KEY` / `@slipway end KEY rc=N …` around each
# measurement (the host samples the stacks' CPU time at both), iperf3's JSON
# between `@bench-json-begin KEY` and `@bench-json-end KEY`.
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
arg() {
  # shellcheck disable=SC2013 # the command line is words, not lines
  for w in $(cat /proc/cmdline); do
    case "$w" in "bench.$1="*) echo "${w#*=}"; return ;; esac
  done
}
T=$(arg t); IPORT=$(arg iperf); EPORT=$(arg echo); RRN=$(arg rrn); CRR=$(arg crr)
GW=10.0.2.2
CS=/sys/devices/system/clocksource/clocksource0/current_clocksource
mark mtu "$(cat /sys/class/net/eth0/mtu)"
# The clock every figure is timed with: a guest that fell back to jiffies
# (4 ms steps) cannot time a round trip.
mark clock-start "$(cat $CS)"

iperf() { # KEY iperf3-args…
  key="$1"; shift
  mark begin "$key"
  timeout $((T + 25)) iperf3 -c "$GW" -p "$IPORT" -t "$T" -J --connect-timeout 5000 "$@" \
    >"/tmp/$key.json" 2>"/tmp/$key.err"
  rc=$?
  mark end "$key" "rc=$rc"
  echo "@bench-json-begin $key"
  cat "/tmp/$key.json" "/tmp/$key.err"
  echo "@bench-json-end $key"
}

small() { # KEY rr-args…
  key="$1"; shift
  mark begin "$key"
  out=$(timeout 30 /bin/rr "$GW" "$EPORT" "$@" 2>"/tmp/$key.err")
  rc=$?
  # shellcheck disable=SC2086 # $out is NAME=VALUE words, one mark field each
  mark end "$key" "rc=$rc" $out "err=$(tail -n1 "/tmp/$key.err" | tr ' ' _)"
}

iperf g2h
iperf h2g -R
small rr rr "$RRN" 5
small crr crr "$CRR" 20000
mark clock-end "$(cat $CS)"
dmesg | grep -i -E 'clocksource|tsc' | tail -n 3 | sed 's/^/@bench-dmesg /'
true
