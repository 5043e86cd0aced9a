#!/usr/bin/env bash
# A three-site duplex cluster on one Linux machine, in network namespaces, for failure drills.
# Run as root from a built checkout (npm ci && npm run build).
#
#   deploy/lab/lab.sh up               # sites a, b (a storage node each) and w (the witness)
#   deploy/lab/lab.sh status           # duplex status, from the witness site
#   deploy/lab/lab.sh cli ARGS...      # any duplex command, from the witness site
#   deploy/lab/lab.sh exec SITE CMD... # a command inside a site (a, b or w), e.g. qemu-io
#   deploy/lab/lab.sh cut SITE SITE    # drop all traffic between two sites (both ways)
#   deploy/lab/lab.sh heal [SITE SITE] # restore one link, or all of them
#   deploy/lab/lab.sh latency MS       # one-way delay on every site's uplink (default 1 ms)
#   deploy/lab/lab.sh down             # stop everything, remove the namespaces and the state
#
# Layout: namespace dxl-wan holds a bridge; each site's namespace (dxl-a, dxl-b, dxl-w) has one
# veth into it, addresses 10.77.0.1 (a), .2 (b), .3 (w). Node a1 serves NBD on 10.77.0.1:10809
# and replicates on :10811; b1 likewise on 10.77.0.2; the witness listens on 10.77.0.3:10815.
# Metrics: :9580 on each node, :10816 on the witness. State and logs: $DUPLEX_LAB_DIR
# (default /tmp/duplex-lab). Cuts are iptables rules inside the sites' namespaces.
# The cluster runs mutual TLS as production should (docs/security.md): `up` makes a CA and
# credentials with `duplex cert` in $DUPLEX_LAB_DIR/credentials; `cli` and `status` use the admin's.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cli="$repo/dist/src/cli/main.js"
state="${DUPLEX_LAB_DIR:-/tmp/duplex-lab}"
sites=(a b w)
declare -A ip=([a]=10.77.0.1 [b]=10.77.0.2 [w]=10.77.0.3)

die() {
  echo "lab: $*" >&2
  exit 2
}

ns() { echo "dxl-$1"; }

check_site() {
  [[ -n "${ip[$1]:-}" ]] || die "unknown site '$1' (sites: a, b, w)"
}

in_site() {
  local site="$1"
  shift
  ip netns exec "$(ns "$site")" "$@"
}

duplex() {
  in_site w node "$cli" "$@" --witness "${ip[w]}:10815" --credentials "$state/credentials/admin"
}

# A CA, and credentials for w1, a1, b1 (naming their addresses) and an admin.
make_credentials() {
  command -v openssl >/dev/null || die "the lab runs cluster TLS: apt-get install openssl"
  local dir="$state/credentials"
  node "$cli" cert ca --dir "$dir/ca" --name duplex-lab-ca >/dev/null
  node "$cli" cert issue w1 --ca-dir "$dir/ca" --out "$dir" --kind witness --ip "${ip[w]}" >/dev/null
  for site in a b; do
    node "$cli" cert issue "${site}1" --ca-dir "$dir/ca" --out "$dir" --kind node \
      --ip "${ip[$site]}" >/dev/null
  done
  node "$cli" cert issue admin --ca-dir "$dir/ca" --out "$dir" --kind admin >/dev/null
}

# Starts a daemon inside a site in the background; its pid goes to $state/NAME.pid. A simple
# command (not a shell function) in the background, so that bash and then `ip netns exec` exec
# into it: $! is the daemon itself, which `down` signals (a function would leave a subshell there,
# and the daemon would outlive `down`).
start_daemon() {
  local site="$1" name="$2"
  shift 2
  ip netns exec "$(ns "$site")" node "$cli" "$@" >"$state/$name.out" 2>"$state/$name.log" &
  echo $! >"$state/$name.pid"
}

wait_ready() {
  local name="$1"
  for _ in $(seq 1 100); do
    [[ -s "$state/$name.out" ]] && return 0
    kill -0 "$(cat "$state/$name.pid")" 2>/dev/null || die "$name exited: $(tail -5 "$state/$name.log")"
    sleep 0.1
  done
  die "$name not ready after 10 s: $(tail -5 "$state/$name.log")"
}

up() {
  [[ $EUID -eq 0 ]] || die "run as root (network namespaces)"
  [[ -f "$cli" ]] || die "build first: npm ci && npm run build"
  ip netns list | grep -q '^dxl-wan' && die "the lab is up already (lab.sh down first)"
  mkdir -p "$state"
  ip netns add dxl-wan
  ip -n dxl-wan link add br0 type bridge
  ip -n dxl-wan link set br0 up
  ip -n dxl-wan link set lo up
  for site in "${sites[@]}"; do
    ip netns add "$(ns "$site")"
    ip link add "veth-$site" type veth peer name "wan-$site"
    ip link set "veth-$site" netns "$(ns "$site")"
    ip link set "wan-$site" netns dxl-wan
    ip -n dxl-wan link set "wan-$site" master br0 up
    in_site "$site" ip link set lo up
    in_site "$site" ip addr add "${ip[$site]}/24" dev "veth-$site"
    in_site "$site" ip link set "veth-$site" up
  done
  latency 1
  make_credentials

  start_daemon w witness witness --name w1 --data-dir "$state/w1" \
    --listen "${ip[w]}:10815" --metrics-listen "${ip[w]}:10816" \
    --credentials "$state/credentials/w1"
  wait_ready witness
  duplex domain add site-a >/dev/null
  duplex domain add site-b >/dev/null
  duplex domain add site-w --kind witness >/dev/null
  duplex node add a1 --domain site-a --address "${ip[a]}:10811" >/dev/null
  duplex node add b1 --domain site-b --address "${ip[b]}:10811" >/dev/null
  for site in a b; do
    start_daemon "$site" "${site}1" node --name "${site}1" --data-dir "$state/${site}1" \
      --listen "${ip[$site]}:10809" --metrics-listen "${ip[$site]}:9580" \
      --witness "${ip[w]}:10815" --credentials "$state/credentials/${site}1"
  done
  wait_ready a1
  wait_ready b1
  duplex volume create lab --size 1G --preferred-domain site-a --wait >/dev/null 2>&1
  cat <<EOT
lab up: a1 ${ip[a]} (site-a), b1 ${ip[b]} (site-b), witness ${ip[w]} (site-w); volume lab
  nbd://${ip[a]}:10809/lab and nbd://${ip[b]}:10809/lab (reachable from inside the sites)
  deploy/lab/lab.sh exec b qemu-io -f raw -c 'write -P 0x5a 0 4M' nbd://${ip[b]}:10809/lab
  deploy/lab/lab.sh cut a b      # the link between the data sites
  deploy/lab/lab.sh status
EOT
}

latency() {
  local ms="${1:-1}"
  for site in "${sites[@]}"; do
    ip -n dxl-wan link show "wan-$site" >/dev/null 2>&1 || continue
    if ! tc -n dxl-wan qdisc replace dev "wan-$site" root netem delay "${ms}ms" 2>/dev/null; then
      echo "lab: no netem in this kernel (modprobe sch_netem); links run without added delay" >&2
      return 0
    fi
  done
}

cut() {
  local x="$1" y="$2"
  check_site "$x"
  check_site "$y"
  [[ "$x" != "$y" ]] || die "cut needs two different sites"
  for pair in "$x $y" "$y $x"; do
    set -- $pair
    in_site "$1" iptables -w -I INPUT -s "${ip[$2]}" -j DROP -m comment --comment "lab-cut-$2"
    in_site "$1" iptables -w -I OUTPUT -d "${ip[$2]}" -j DROP -m comment --comment "lab-cut-$2"
  done
  echo "cut: site-$x <-/-> site-$y"
}

heal_pair() {
  local x="$1" y="$2"
  for pair in "$x $y" "$y $x"; do
    set -- $pair
    while in_site "$1" iptables -w -D INPUT -s "${ip[$2]}" -j DROP -m comment --comment "lab-cut-$2" 2>/dev/null; do :; done
    while in_site "$1" iptables -w -D OUTPUT -d "${ip[$2]}" -j DROP -m comment --comment "lab-cut-$2" 2>/dev/null; do :; done
  done
}

heal() {
  if [[ $# -eq 2 ]]; then
    check_site "$1"
    check_site "$2"
    heal_pair "$1" "$2"
    echo "healed: site-$1 <-> site-$2"
  else
    heal_pair a b
    heal_pair a w
    heal_pair b w
    echo "healed: every link"
  fi
}

down() {
  for name in a1 b1 witness; do
    [[ -f "$state/$name.pid" ]] || continue
    kill -TERM "$(cat "$state/$name.pid")" 2>/dev/null || true
  done
  for name in a1 b1 witness; do
    [[ -f "$state/$name.pid" ]] || continue
    local pid
    pid="$(cat "$state/$name.pid")"
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  for site in "${sites[@]}" wan; do
    ip netns del "$(ns "$site")" 2>/dev/null || true
  done
  rm -rf "$state"
  echo "lab down"
}

command="${1:-}"
shift || true
case "$command" in
  up) up ;;
  down) down ;;
  status) duplex status "$@" ;;
  cli) duplex "$@" ;;
  exec)
    [[ $# -ge 2 ]] || die "usage: lab.sh exec SITE COMMAND..."
    check_site "$1"
    in_site "$@"
    ;;
  cut)
    [[ $# -eq 2 ]] || die "usage: lab.sh cut SITE SITE"
    cut "$1" "$2"
    ;;
  heal) heal "$@" ;;
  latency) latency "${1:-1}" ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    [[ -z "$command" ]] || exit 2
    ;;
esac
