#!/usr/bin/env bash
# An emulated cluster on one machine: 1 primary + N replicas, each in its own network namespace
# with its own address, joined by a bridge that lives in a namespace of its own, each node's
# egress shaped with tc. Nothing is created in the host's own network namespace: no link, no
# address, no route, no qdisc (the veth pairs are created inside the bridge namespace).
#
#   scripts/cluster.sh up N [--rate 1gbit] [--mtu 1500] [--qdisc htb|tbf] [--cc reno|bbr|…]
#                           [--rails R] [--rail-rate K=RATE]... [--ingress]
#   scripts/cluster.sh down
#   scripts/cluster.sh exec NODE CMD...        run CMD inside NODE's namespace (exec'd: same PID)
#   scripts/cluster.sh addr NODE [K]           print NODE's IPv4 address on rail K; without K, one
#                                              line per rail of the running cluster (rail 0 first)
#   scripts/cluster.sh nodes                   print "NODE NAMESPACE ADDRESS…" (one per rail) per node
#   scripts/cluster.sh status                  namespaces, addresses and tc counters
#   scripts/cluster.sh rail-down NODE K        take NODE's rail-K link down (`ip link set down`)
#   scripts/cluster.sh rail-up NODE K          and up again (its address and route come back)
#
# NODE is `p` (the primary; alias `primary`), `r1` … `rN`, or `br` (the bridge namespace).
#
# Rails (--rails R, 1…8, default 1): every node gets R links, rail K (0 … R-1) on a bridge of its
# own (one switch per rail: rail K of a node reaches only rail K of the others) with a subnet of
# its own, 10.77.K.x (198.18.K.x with SC_SUBNET=198.18.0). Rail 0 is exactly the single-rail
# layout below; rail K >= 1 adds bridge `scvbrK`, ports `scv<node>kK` and node link `scvK`.
# Every rail is shaped to --rate; `--rail-rate K=RATE` (repeatable) gives rail K another rate on
# every node (a slow NIC). --ingress also shapes the other direction of every link: the same
# qdisc on each bridge-side port's egress (what the bridge delivers to the node), so both
# directions of every link are limited to the rail's rate.
#
# Layout (PREFIX defaults to `sc`; SC_CLUSTER=xyz gives a second, independent cluster):
#   netns PREFIX-br   bridge `scvbr` + one port per node (`scvp`, `scvr1`, …); no address
#   netns PREFIX-p    `scv0` (veth peer of scvp)  10.77.0.10/24   (SC_SUBNET=198.18.0 for 198.18.0.x)
#   netns PREFIX-rK   `scv0` (veth peer of scvrK) 10.77.0.(10+K)/24
# Every node namespace has `lo` up, IPv6 off (no DAD/RS chatter), and on `scv0` a root qdisc:
#   htb (default): `htb default 1` + class 1:1 `rate R ceil R burst B cburst B`, leaf: default pfifo
#   tbf:           `tbf rate R burst B latency 50ms`
#   with B = max(1 ms of R, 128 KiB) = 128 KiB at 1gbit (see shape() for why not tc's default);
#   rail K's link `scvK` likewise (R: that rail's rate), and with --ingress each bridge port too.
# --cc sets net.ipv4.tcp_congestion_control in every node namespace (default: what a new namespace
# inherits from the host, e.g. bbr; a non-initial namespace may only pick from the host's
# net.ipv4.tcp_allowed_congestion_control, so an available algorithm missing there, e.g. cubic,
# is added to that host list: the only host setting the script changes; no default changes).
# Without --ingress the bridge ports have no qdisc (veth default: noqueue), so each node's only
# shaper is its own egress: a chain hop is limited by the sender's rate, a star by the primary's.
#
# Rate semantics: tc's `gbit`/`mbit`/`kbit` are decimal (1gbit = 10^9 bit/s). htb and tbf charge
# each packet qdisc_pkt_len(skb): skb->len at the qdisc, which on a veth includes the 14-byte
# Ethernet header, and for a GSO super-packet the headers of every segment it will become. So one
# full-size TCP segment at MTU 1500 costs 1514 bytes (1448 payload with timestamps): a TCP stream
# tops out at R x 1448/1514 = 0.9564 R of payload. Preamble, FCS and inter-frame gap (24 bytes on
# a real 1GbE wire) are not charged; a real NIC at the same line rate would be ~1.6% slower.
#
# `up` first runs `down` (so it is idempotent: the result depends only on its arguments), and on
# any failure or interrupt it tears down what it had built. `down` kills the processes still
# running in the cluster's namespaces (by PID, from `ip netns pids`), deletes exactly the
# namespaces named PREFIX-br, PREFIX-p, PREFIX-r<digits>, and succeeds when there is nothing to
# remove. Deleting a namespace destroys its veth ends, which destroys their peers.
#
# Needs root, iproute2 (`ip`, `tc`; scripts/deps.sh installs it) and flock (util-linux).
set -euo pipefail

PREFIX=${SC_CLUSTER:-sc}
declare -A RAIL_RATES=() # up: --rail-rate K=RATE
SUBNET=${SC_SUBNET:-10.77.0}
BRIDGE=scvbr
MAX_N=200 # addresses .11 … .210
MAX_RAILS=8

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    exit "${1:-2}"
}

[[ "$PREFIX" =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "SC_CLUSTER must match [a-z][a-z0-9]{0,7}, got '$PREFIX'"
case "$SUBNET" in
    10.77.0 | 198.18.0) ;;
    *) die "SC_SUBNET must be 10.77.0 or 198.18.0, got '$SUBNET'" ;;
esac

need_tools() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces)"
    command -v ip >/dev/null || die "'ip' not found: run scripts/deps.sh (package iproute2)"
    command -v tc >/dev/null || die "'tc' not found: run scripts/deps.sh (package iproute2)"
}

# ns_of NODE -> namespace name
ns_of() {
    case "$1" in
        p | primary) echo "$PREFIX-p" ;;
        br) echo "$PREFIX-br" ;;
        r[1-9] | r[1-9][0-9] | r[1-9][0-9][0-9]) echo "$PREFIX-$1" ;;
        *) die "unknown node '$1' (use p, r1…rN or br)" ;;
    esac
}

# addr_of NODE [RAIL] -> IPv4 address (no prefix length) of NODE on RAIL (default 0)
addr_of() {
    local net="${SUBNET%.0}.${2:-0}"
    case "$1" in
        p | primary) echo "$net.10" ;;
        r[1-9] | r[1-9][0-9] | r[1-9][0-9][0-9])
            local k=${1#r}
            ((k <= MAX_N)) || die "node $1: at most $MAX_N replicas"
            echo "$net.$((10 + k))"
            ;;
        *) die "node '$1' has no address (use p or r1…rN)" ;;
    esac
}

# Names on rail K: the node's link, the rail's bridge, a node's port on that bridge. Rail 0 keeps
# the single-rail names (scv0, scvbr, scv<node>).
nic_of() { echo "scv$1"; }
bridge_of() { if (($1 == 0)); then echo "$BRIDGE"; else echo "$BRIDGE$1"; fi; }
port_of() {
    local node=$1
    [[ "$node" == primary ]] && node=p
    if (($2 == 0)); then echo "scv$node"; else echo "scv${node}k$2"; fi
}

# check_rail K: K is a rail number 0 … MAX_RAILS-1.
check_rail() {
    [[ "$1" =~ ^[0-9]$ ]] && (($1 < MAX_RAILS)) || die "rail must be 0…$((MAX_RAILS - 1)), got '$1'"
}

# How many rails the running cluster has (its bridges); 1 when it is not up.
rails_now() {
    local c
    c=$(ip -n "$PREFIX-br" -o link show type bridge 2>/dev/null | grep -cE "^[0-9]+: $BRIDGE[0-9]*[:@]") || true
    if ((c > 0)); then echo "$c"; else echo 1; fi
}

# The namespaces this cluster owns, whatever state they are in.
our_namespaces() {
    local n
    {
        ip netns list 2>/dev/null | awk '{print $1}'
        # A namespace file left by an interrupted `ip netns add` may not be listed.
        if [[ -d /run/netns ]]; then
            for n in /run/netns/*; do [[ -e "$n" ]] && basename "$n"; done
        fi
    } | grep -E "^${PREFIX}-(br|p|r[0-9]+)\$" | sort -u || true
}

# Serialise up/down of the same cluster (two runs racing would tear each other's namespaces down).
take_lock() {
    local dir=/run/lock
    [[ -d "$dir" && -w "$dir" ]] || dir=${TMPDIR:-/tmp}
    exec 9>"$dir/shardcast-cluster-$PREFIX.lock"
    flock -w 120 9 || die "another cluster.sh up/down of '$PREFIX' holds $dir/shardcast-cluster-$PREFIX.lock"
}

do_down() {
    local nss=() ns pid pids=() i alive
    mapfile -t nss < <(our_namespaces)
    ((${#nss[@]} > 0)) || return 0
    for ns in "${nss[@]}"; do
        while read -r pid; do
            [[ -n "$pid" ]] && pids+=("$pid")
        done < <(ip netns pids "$ns" 2>/dev/null || true)
    done
    if ((${#pids[@]} > 0)); then
        say "stopping ${#pids[@]} process(es) still in the cluster: ${pids[*]}"
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for ((i = 0; i < 50; i++)); do
            alive=0
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.1
        done
        for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    for ns in "${nss[@]}"; do
        if ! ip netns del "$ns" 2>/dev/null; then
            umount -l "/run/netns/$ns" 2>/dev/null || true
            rm -f "/run/netns/$ns"
        fi
    done
    mapfile -t nss < <(our_namespaces)
    ((${#nss[@]} == 0)) || die "could not remove: ${nss[*]}"
}

# shape NS DEV RATE QDISC: root qdisc on NS's DEV.
shape() {
    local ns=$1 dev=$2 rate=$3 qdisc=$4 burst
    # Bucket: 1 ms of traffic, at least 128 KiB (whole 64 KiB GSO packets pass unsegmented).
    # tc's default htb burst is rate/HZ-ish (1375 bytes = 11 us at 1gbit): the shaper then
    # depends on hrtimer latency, and on this 2-core VM a single TCP stream got only 0.91-0.96 of
    # the rate (iperf3, measured); with 1 ms it gets 0.996-0.999. 1 ms at 1 Gbit/s lets at most
    # 125 KB pass early once after an idle period: 0.01% of a 1 GiB push.
    burst=$(($(rate_bps "$rate") / 8 / 1000))
    ((burst >= 131072)) || burst=131072
    case "$qdisc" in
        htb)
            tc -n "$ns" qdisc add dev "$dev" root handle 1: htb default 1
            # quantum only matters when classes share; set it so the kernel does not warn that
            # rate/r2q is huge.
            tc -n "$ns" class add dev "$dev" parent 1: classid 1:1 htb rate "$rate" ceil "$rate" \
                burst "$burst" cburst "$burst" quantum 200000
            ;;
        tbf)
            tc -n "$ns" qdisc add dev "$dev" root handle 1: tbf rate "$rate" burst "$burst" latency 50ms
            ;;
    esac
}

# rate_bps 1gbit -> 1000000000
rate_bps() {
    local r=${1,,} n u
    [[ "$r" =~ ^([0-9]+)(bit|kbit|mbit|gbit|tbit)$ ]] || die "bad rate '$1' (use e.g. 1gbit, 500mbit, or none)"
    n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
    case "$u" in
        bit) echo "$n" ;;
        kbit) echo $((n * 1000)) ;;
        mbit) echo $((n * 1000000)) ;;
        gbit) echo $((n * 1000000000)) ;;
        tbit) echo $((n * 1000000000000)) ;;
    esac
}

sysctl_ns() {
    local ns=$1
    shift
    [[ -d /proc/sys/net/ipv6 ]] || return 0
    ip netns exec "$ns" sysctl -q -w "$@" >/dev/null
}

UP_DONE=0
on_up_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if ((UP_DONE == 0)); then
        say "up failed or was interrupted (status $rc): removing what it built"
        do_down || true
    fi
    exit "$rc"
}

# set_rail_rate K=RATE: the value of one --rail-rate.
set_rail_rate() {
    [[ "$1" =~ ^([0-9])=(.+)$ ]] || die "--rail-rate takes K=RATE (e.g. 1=250mbit), got '$1'"
    local k=${BASH_REMATCH[1]} v=${BASH_REMATCH[2],,}
    check_rail "$k"
    [[ "$v" == none ]] || rate_bps "$v" >/dev/null
    RAIL_RATES[$k]=$v
}

# allow_cc NAME: a namespace other than the host's may only pick a congestion control from the
# host's net.ipv4.tcp_allowed_congestion_control (e.g. "reno bbr": cubic is built in but not
# allowed). When NAME is available but not allowed, add it to that list: the one host setting
# this script touches, and it changes no one's default.
allow_cc() {
    local f=/proc/sys/net/ipv4/tcp_allowed_congestion_control allowed
    allowed=$(cat "$f" 2>/dev/null) || return 0
    [[ " $allowed " == *" $1 "* ]] && return 0
    [[ " $(cat /proc/sys/net/ipv4/tcp_available_congestion_control) " == *" $1 "* ]] || return 0
    say "adding '$1' to the host's net.ipv4.tcp_allowed_congestion_control ($allowed) so that namespaces may use it"
    echo "$allowed $1" >"$f"
}

# rail_rate K: rail K's rate (RAIL_RATES[K] when given, else RATE).
rail_rate() { echo "${RAIL_RATES[$1]:-$RATE}"; }

# add_rail NODE NS K: NODE's rail-K link, its port on rail K's bridge, address and shapers.
add_rail() {
    local node=$1 ns=$2 k=$3 br="$PREFIX-br" port nic rate
    port=$(port_of "$node" "$k") nic=$(nic_of "$k") rate=$(rail_rate "$k")
    # Both ends are created inside namespaces: the pair is born in the bridge namespace and its
    # peer goes straight to the node's.
    ip -n "$br" link add "$port" mtu "$MTU" type veth peer name "$nic" mtu "$MTU" netns "$ns"
    ip -n "$br" link set "$port" master "$(bridge_of "$k")" up
    ip -n "$ns" addr add "$(addr_of "$node" "$k")/24" dev "$nic"
    ip -n "$ns" link set "$nic" up
    [[ "$rate" == none ]] && return 0
    shape "$ns" "$nic" "$rate" "$QDISC"
    # The other direction: what the rail's bridge hands to this node.
    ((INGRESS)) && shape "$br" "$port" "$rate" "$QDISC"
    return 0
}

# do_up N: builds the cluster from RATE MTU QDISC CC RAILS INGRESS RAIL_RATES.
do_up() {
    local n=$1 k node ns
    do_down
    trap on_up_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    local br="$PREFIX-br"
    ip netns add "$br"
    ip -n "$br" link set lo up
    sysctl_ns "$br" net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    for ((k = 0; k < RAILS; k++)); do
        ip -n "$br" link add "$(bridge_of "$k")" type bridge stp_state 0 forward_delay 0
        ip -n "$br" link set "$(bridge_of "$k")" mtu "$MTU" up
    done

    local nodes=(p)
    for ((k = 1; k <= n; k++)); do nodes+=("r$k"); done
    for node in "${nodes[@]}"; do
        ns=$(ns_of "$node")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        sysctl_ns "$ns" net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        for ((k = 0; k < RAILS; k++)); do add_rail "$node" "$ns" "$k"; done
        if [[ -n "$CC" ]]; then
            allow_cc "$CC"
            ip netns exec "$ns" sysctl -q -w "net.ipv4.tcp_congestion_control=$CC" >/dev/null ||
                die "cannot set congestion control '$CC' in $ns (allowed: $(ip netns exec "$ns" sysctl -n net.ipv4.tcp_allowed_congestion_control))"
        fi
    done
    UP_DONE=1
    trap - EXIT INT TERM
    local rates="rate $RATE" dirs="egress"
    for k in "${!RAIL_RATES[@]}"; do rates+=", rail $k ${RAIL_RATES[$k]}"; done
    ((INGRESS)) && dirs="egress and ingress"
    say "up: primary + $n replica(s), $RAILS rail(s), $rates per node $dirs ($QDISC), MTU $MTU, TCP congestion control $(ip netns exec "$PREFIX-p" sysctl -n net.ipv4.tcp_congestion_control), prefix $PREFIX"
    for node in "${nodes[@]}"; do print_node "$node" "$RAILS"; done
}

# print_node NODE R: "NODE NAMESPACE ADDR0 [ADDR1 …]"
print_node() {
    local node=$1 k line
    line=$(printf '%-4s %-10s %s' "$node" "$(ns_of "$node")" "$(addr_of "$node" 0)")
    for ((k = 1; k < $2; k++)); do line+=" $(addr_of "$node" "$k")"; done
    echo "$line"
}

# do_rail NODE K up|down
do_rail() {
    local ns
    ns=$(ns_of "$1")
    [[ "$1" != br ]] || die "rail-$3 takes a node (p, r1…rN), not br"
    check_rail "$2"
    [[ -e "/run/netns/$ns" ]] || die "namespace $ns does not exist (run: cluster.sh up N)"
    ip -n "$ns" link show "$(nic_of "$2")" >/dev/null 2>&1 || die "$1 has no rail $2 ($(rails_now) rail(s))"
    ip -n "$ns" link set "$(nic_of "$2")" "$3"
}

do_nodes() {
    local ns node rails
    rails=$(rails_now)
    # p first, then r1, r2, … in numeric order.
    while read -r ns; do
        node=${ns#"$PREFIX"-}
        print_node "$node" "$rails"
    done < <(our_namespaces | awk -v pre="$PREFIX-" '{n = substr($0, length(pre) + 1)}
        n == "p" {print 0, $0} n ~ /^r[0-9]+$/ {print substr(n, 2), $0}' | sort -n | cut -d' ' -f2)
}

do_status() {
    local ns nss=()
    mapfile -t nss < <(our_namespaces)
    if ((${#nss[@]} == 0)); then
        echo "no cluster '$PREFIX'"
        return 0
    fi
    for ns in "${nss[@]}"; do
        echo "== $ns"
        if [[ "$ns" == "$PREFIX-br" ]]; then
            ip -n "$ns" -br link show
            tc -n "$ns" -s qdisc show 2>/dev/null | grep -A3 -E '^qdisc (htb|tbf)' || true
        else
            ip -n "$ns" -br addr show
            tc -n "$ns" -s qdisc show 2>/dev/null || true
            echo "pids: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        fi
    done
}

cmd=${1:-}
[[ -n "$cmd" ]] || usage 2
shift
case "$cmd" in
    up)
        need_tools
        [[ $# -ge 1 ]] || die "usage: cluster.sh up N [--rate 1gbit] [--mtu 1500] [--qdisc htb|tbf] [--cc NAME] [--rails R] [--rail-rate K=RATE]... [--ingress]"
        n=$1
        shift
        if [[ ! "$n" =~ ^[1-9][0-9]*$ ]] || ((n > MAX_N)); then die "N must be 1…$MAX_N, got '$n'"; fi
        RATE=1gbit MTU=1500 QDISC=htb CC= RAILS=1 INGRESS=0
        while [[ $# -gt 0 ]]; do
            case "$1" in
                --rate) RATE=${2:?--rate needs a value}; shift 2 ;;
                --rate=*) RATE=${1#*=}; shift ;;
                --mtu) MTU=${2:?--mtu needs a value}; shift 2 ;;
                --mtu=*) MTU=${1#*=}; shift ;;
                --qdisc) QDISC=${2:?--qdisc needs a value}; shift 2 ;;
                --qdisc=*) QDISC=${1#*=}; shift ;;
                --cc) CC=${2:?--cc needs a value}; shift 2 ;;
                --cc=*) CC=${1#*=}; shift ;;
                --rails) RAILS=${2:?--rails needs a value}; shift 2 ;;
                --rails=*) RAILS=${1#*=}; shift ;;
                --rail-rate) set_rail_rate "${2:?--rail-rate needs K=RATE}"; shift 2 ;;
                --rail-rate=*) set_rail_rate "${1#*=}"; shift ;;
                --ingress) INGRESS=1; shift ;;
                *) die "unknown option '$1'" ;;
            esac
        done
        RATE=${RATE,,}
        [[ "$RATE" == none ]] || rate_bps "$RATE" >/dev/null
        if [[ ! "$MTU" =~ ^[0-9]+$ ]] || ((MTU < 576 || MTU > 9000)); then die "MTU must be 576…9000, got '$MTU'"; fi
        [[ "$QDISC" == htb || "$QDISC" == tbf ]] || die "--qdisc must be htb or tbf, got '$QDISC'"
        [[ -z "$CC" || "$CC" =~ ^[a-z0-9_]+$ ]] || die "bad --cc '$CC'"
        if [[ ! "$RAILS" =~ ^[1-9]$ ]] || ((RAILS > MAX_RAILS)); then die "--rails must be 1…$MAX_RAILS, got '$RAILS'"; fi
        for k in "${!RAIL_RATES[@]}"; do
            ((k < RAILS)) || die "--rail-rate $k=…: the cluster has rails 0…$((RAILS - 1))"
        done
        take_lock
        do_up "$n"
        ;;
    down)
        need_tools
        [[ $# -eq 0 ]] || die "usage: cluster.sh down"
        take_lock
        do_down
        ;;
    exec)
        [[ $# -ge 2 ]] || die "usage: cluster.sh exec NODE CMD..."
        ns=$(ns_of "$1")
        shift
        [[ -e "/run/netns/$ns" ]] || die "namespace $ns does not exist (run: cluster.sh up N)"
        exec ip netns exec "$ns" "$@"
        ;;
    addr)
        [[ $# -eq 1 || $# -eq 2 ]] || die "usage: cluster.sh addr NODE [RAIL]"
        if [[ $# -eq 2 ]]; then
            check_rail "$2"
            addr_of "$1" "$2"
        else
            addr_of "$1" 0
            rails=$(rails_now)
            for ((k = 1; k < rails; k++)); do addr_of "$1" "$k"; done
        fi
        ;;
    nodes) do_nodes ;;
    status) need_tools; do_status ;;
    rail-down | rail-up)
        need_tools
        [[ $# -eq 2 ]] || die "usage: cluster.sh $cmd NODE RAIL"
        do_rail "$1" "$2" "${cmd#rail-}"
        ;;
    -h | --help | help) usage 0 ;;
    *) die "unknown command '$cmd' (up, down, exec, addr, nodes, status, rail-down, rail-up)" ;;
esac
