#!/usr/bin/env bash
# Rails (issue 16): pushes over R rails per node on the emulated cluster (scripts/cluster.sh
# --rails R), one file of SIZE bytes, MTU 1500, every link shaped to its rail's rate in both
# directions (--ingress), a chain of N replicas; each replica serves on its rail-0 address with
# `--rail` for each of its rails, the primary pushes with `--lanes L --rail` for each of its own.
# Cases (CASES, any of):
#   a   R = 2 rails of RATE, --lanes 2: time / (size / (2 x RATE))
#   b   R = 2, rail 1 at SLOW (250mbit), --lanes 2: time / (size / (RATE + SLOW))
#   c0  as c, with rail 0 (the hops' first connections) taken down instead of rail 1
#   c   as a, and rail 1 of every node taken down (`cluster.sh rail-down NODE 1`) at half of a's
#       ideal time: time against 1.2 x (t_fail + left / RATE), left = SIZE minus what r1 had
#       received at t_fail (its links' rx bytes x 1448/1514); every replica's bytes compared
#   d   the table N in TABLE_N (2 4) x R in 1 2 (R lanes) at RATE: time / (size / (R x RATE))
# Each case brings the cluster up for itself; REPS pushes each (medians). The CPU seconds
# (utime + stime) of the push and of every serve during each push are recorded beside it (2
# cores for 5 processes: a case may be CPU-bound).
#
# Env: SIZE (1G), N (4), REPS (3), RATE (1gbit), SLOW (250mbit), MTU (1500), CASES (a b c d),
#      TABLE_N ("2 4"), PORT (7071), PUSH_ARGS, OUT (results/<date>-rails), KEEP_WORK=1,
#      OLD_BIN (a binary to compare: a second set of serves on PORT+1 runs it, and each rep
#      pushes with it right after the new one, on the same cluster; the summary gives both
#      medians and new / old).
# Run it under the shared locks:
#   flock /tmp/sc-netns.lock flock /tmp/sc-bench.lock scripts/bench-rails.sh
# Needs root, iproute2, python3, cmp (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

: "${N:=4}" "${REPS:=3}" "${SLOW:=250mbit}" "${MTU:=1500}" "${CASES:=a b c d}" "${TABLE_N:=2 4}" "${PUSH_ARGS:=}"
# SIZE, RATE, PORT, SC_CLUSTER defaults; CLUSTER, bytes; checks N, REPS, root, tc.
cluster_bench_args
OUT=${OUT:-results/$(date -u +%Y-%m-%d)-rails}
maxn=$N
for n in $TABLE_N; do ((n > maxn)) && maxn=$n; done
need=$(((2 * maxn + 1) * bytes + (512 << 20)))
FILES=1
# Builds release, makes $work (the binary copied in, the cluster torn down on exit) and $work/src.
cluster_bench_prepare bench-rails "$need"
if [[ -n "${OLD_BIN:-}" ]]; then
    cp "$OLD_BIN" "$work/shardcast-old"
fi
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%d-%H%M%S)
dirty=""
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || dirty="+dirty"
cmdline="SIZE=$SIZE N=$N REPS=$REPS RATE=$RATE SLOW=$SLOW MTU=$MTU CASES=\"$CASES\" TABLE_N=\"$TABLE_N\""
[[ -n "$PUSH_ARGS" ]] && cmdline+=" PUSH_ARGS=\"$PUSH_ARGS\""
[[ -n "${OLD_BIN:-}" ]] && cmdline+=" OLD_BIN=$OLD_BIN"
cmdline+=" scripts/bench-rails.sh"

BR_WORK=$work BR_BYTES=$bytes BR_N=$N BR_REPS=$REPS BR_RATE=$RATE BR_SLOW=$SLOW BR_MTU=$MTU \
    BR_CASES=$CASES BR_TABLE_N=$TABLE_N BR_PORT=$PORT BR_PUSH_ARGS=$PUSH_ARGS BR_CLUSTER=$CLUSTER \
    BR_PREFIX=$SC_CLUSTER BR_CSV="$OUT/rails-$stamp.csv" BR_SUMMARY="$OUT/summary-$stamp.txt" \
    BR_HEADER="# $cmdline; commit $(git_rev)$dirty; $(date -u +%FT%TZ); $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" \
    python3 - <<'PY'
import csv, os, re, resource, shutil, statistics, subprocess, sys, time

E = os.environ
WORK, BYTES, N, REPS = E["BR_WORK"], int(E["BR_BYTES"]), int(E["BR_N"]), int(E["BR_REPS"])
MTU, PORT, PREFIX, CLUSTER = E["BR_MTU"], int(E["BR_PORT"]), E["BR_PREFIX"], E["BR_CLUSTER"]
PUSH_ARGS = E["BR_PUSH_ARGS"].split()
BIN = os.path.join(WORK, "shardcast")
# (label, binary, port): the binary measured, and the one it is compared with.
BINS = [("new", BIN, PORT)]
if os.path.exists(os.path.join(WORK, "shardcast-old")):
    BINS.append(("old", os.path.join(WORK, "shardcast-old"), PORT + 1))
UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
PAYLOAD = 1448 / 1514  # payload share of a full-size frame at MTU 1500 (what rx counters include)


def bps(rate):
    m = re.fullmatch(r"(\d+)(kbit|mbit|gbit)", rate)
    if not m:
        sys.exit(f"error: rate {rate!r} must look like 1gbit")
    return int(m[1]) * UNITS[m[2]]


RATE, SLOW = E["BR_RATE"], E["BR_SLOW"]
HEADER, rows, summary = E["BR_HEADER"], [], []


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def addr(node, k):
    return sh(CLUSTER, "addr", node, str(k))


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rx(node, rails):
    total = 0
    for k in range(rails):
        dev = f"scv{k}"
        total += int(sh("ip", "netns", "exec", f"{PREFIX}-{node}", "cat", f"/sys/class/net/{dev}/statistics/rx_bytes"))
    return total


class Cluster:
    def __init__(self, n, rails, rail_rates):
        self.n, self.rails = n, rails
        args = [CLUSTER, "up", str(n), "--rate", RATE, "--mtu", MTU, "--rails", str(rails), "--ingress"]
        for k, r in rail_rates.items():
            args += ["--rail-rate", f"{k}={r}"]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        # Per binary label: its serves (r1..rN) and their addresses.
        self.serves, self.to = {}, {}
        for label, binary, port in BINS:
            self.serves[label], self.to[label] = [], []
            for k in range(1, n + 1):
                node = f"r{k}"
                mine = [addr(node, j) for j in range(rails)]
                rails_args = [a for ip in mine for a in ("--rail", ip)] if rails > 1 else []
                root = os.path.join(WORK, f"root-{node}-{label}")
                subprocess.run(["rm", "-rf", root], check=True)
                logf = open(os.path.join(WORK, f"serve-{node}-{label}.log"), "w")
                p = subprocess.Popen(
                    ["ip", "netns", "exec", f"{PREFIX}-{node}", "env", "NO_COLOR=1", binary, "serve", "--listen",
                     f"{mine[0]}:{port}", "--root", root, "--keep", "1", *rails_args],
                    stdout=subprocess.DEVNULL, stderr=logf)
                self.serves[label].append(p)
                self.to[label].append(f"{mine[0]}:{port}")
                path = logf.name
                for _ in range(300):
                    if f"listening on {mine[0]}:{port}" in re.sub(r"\x1b\[[0-9;]*m", "", open(path).read()):
                        break
                    if p.poll() is not None:
                        sys.exit(f"error: serve on {node} exited:\n{open(path).read()}")
                    time.sleep(0.1)
                else:
                    sys.exit(f"error: serve on {node} did not listen within 30 s")
        self.p_rails = [addr("p", j) for j in range(rails)]
        self.version = 0

    def push_cmd(self, lanes, label):
        self.version += 1
        rails = [a for ip in self.p_rails for a in ("--rail", ip)] if self.rails > 1 else []
        binary = dict((l, b) for l, b, _ in BINS)[label]
        return ["ip", "netns", "exec", f"{PREFIX}-p", binary, "push", os.path.join(WORK, "src"), "--name", "b",
                "--version", str(self.version), "--json", "--to", ",".join(self.to[label]), "--lanes", str(lanes),
                *rails, *PUSH_ARGS]

    def push(self, lanes, fail_at=None, fail_rail="1", label="new"):
        """One timed push with the binary `label`; with fail_at (s), rail fail_rail of every
        node goes down then. Returns (seconds, cpu dict, failure info)."""
        serves = self.serves[label]
        before = [cpu(s.pid) for s in serves]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rx0 = rx("r1", self.rails)
        cmd = self.push_cmd(lanes, label)
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        fail = None
        if fail_at is not None:
            time.sleep(max(0.0, fail_at - (time.monotonic() - t0)))
            t_fail = time.monotonic() - t0
            got = (rx("r1", self.rails) - rx0) * PAYLOAD
            for node in ["p"] + [f"r{k}" for k in range(1, self.n + 1)]:
                sh(CLUSTER, "rail-down", node, fail_rail)
            fail = (t_fail, max(0.0, BYTES - got))
        out, err = p.communicate(timeout=600)
        t = time.monotonic() - t0
        if fail_at is not None:
            for node in ["p"] + [f"r{k}" for k in range(1, self.n + 1)]:
                sh(CLUSTER, "rail-up", node, fail_rail)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0 or not re.search(r'"ok":\s*true', out):
            sys.exit(f"error: {' '.join(cmd)} exited {p.returncode}\n{out[-3000:]}\n{err[-3000:]}")
        # Every replica's bytes identical to the source.
        for k in range(1, self.n + 1):
            f = os.path.join(WORK, f"root-r{k}-{label}", "b", str(self.version), "shard-000.bin")
            if subprocess.run(["cmp", "-s", f, os.path.join(WORK, "src", "shard-000.bin")]).returncode != 0:
                sys.exit(f"error: r{k}'s copy differs from the source (version {self.version})")
        # Drop the version everywhere: the next rep pushes the same bytes, and a repair (an
        # incremental push) would find them held in this version and move nothing.
        for k in range(1, self.n + 1):
            vdir = os.path.join(WORK, f"root-r{k}-{label}", "b")
            shutil.rmtree(os.path.join(vdir, str(self.version)), ignore_errors=True)
            if os.path.exists(os.path.join(vdir, f"{self.version}.manifest")):
                os.remove(os.path.join(vdir, f"{self.version}.manifest"))
        # Chunks per lane of the first hop (the primary's balance), from push --json.
        try:
            import json
            self.last_lanes = "/".join(str(x) for x in json.loads(out).get("lane_chunks", []))
        except ValueError:
            self.last_lanes = ""
        c = {"p": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)}
        for k, s in enumerate(serves):
            c[f"r{k + 1}"] = cpu(s.pid) - before[k]
        return t, c, fail

    def down(self):
        every = [s for serves in self.serves.values() for s in serves]
        for s in every:
            s.terminate()
        for s in every:
            s.wait()
        subprocess.run([CLUSTER, "down"], check=True, stdout=subprocess.DEVNULL)


def run_case(name, n, rails, rail_rates, lanes, ideal_bps, fail=False, fail_rail="1"):
    log(f"case {name}: N={n}, {rails} rail(s) {rail_rates or ''}, --lanes {lanes}")
    c = Cluster(n, rails, rail_rates)
    ideal = BYTES * 8 / ideal_bps
    times = {label: [] for label, _, _ in BINS}
    ratios = {label: [] for label, _, _ in BINS}
    try:
        for rep in range(REPS):
            for label, _, _ in BINS:
                t, cp, f = c.push(lanes, fail_at=ideal / 2 if fail else None, fail_rail=fail_rail, label=label)
                row = {"case": name, "bin": label, "n": n, "rails": rails,
                       "rates": "/".join([RATE] + [rail_rates.get(k, RATE) for k in range(1, rails)]),
                       "lanes": lanes, "rep": rep, "seconds": round(t, 3), "ideal": round(ideal, 3)}
                if f:
                    t_fail, left = f
                    bound = 1.2 * (t_fail + left * 8 / bps(RATE))
                    row.update(t_fail=round(t_fail, 3), left_bytes=int(left), bound=round(bound, 3), ratio=round(t / bound, 3))
                else:
                    row.update(ratio=round(t / ideal, 3))
                row.update({f"cpu_{k}": round(v, 2) for k, v in cp.items()})
                row["lane_chunks"] = c.last_lanes
                rows.append(row)
                ratios[label].append(row["ratio"])
                times[label].append(t)
                log(f"  rep {rep} {label}: {t:.3f} s, ratio {row['ratio']}, lanes {c.last_lanes}, cpu "
                    + " ".join(f"{k}={v:.2f}" for k, v in cp.items()))
    finally:
        c.down()
    what = "time / (1.2 x (t_fail + left / rate))" if fail else "time / ideal"
    for label, _, _ in BINS:
        tag = "" if len(BINS) == 1 else f" [{label}]"
        summary.append(f"{name:10} N={n} R={rails} rates={rows[-1]['rates']:16} lanes={lanes}{tag}: median {statistics.median(times[label]):.3f} s, "
                       f"{what} median {statistics.median(ratios[label]):.3f} (ideal {ideal:.3f} s; all {ratios[label]})")
    if len(BINS) > 1:
        per_rep = [round(a / b, 3) for a, b in zip(times["new"], times["old"])]
        summary.append(f"{'':10} new / old time: median of medians {statistics.median(times['new']) / statistics.median(times['old']):.3f} (per rep {per_rep})")


cases = E["BR_CASES"].split()
r = bps(RATE)
if "a" in cases:
    run_case("a", N, 2, {}, 2, 2 * r)
if "b" in cases:
    run_case("b", N, 2, {1: SLOW}, 2, r + bps(SLOW))
if "c" in cases:
    run_case("c", N, 2, {}, 2, 2 * r, fail=True)
if "c0" in cases:
    run_case("c0", N, 2, {}, 2, 2 * r, fail=True, fail_rail="0")
if "d" in cases:
    for n in map(int, E["BR_TABLE_N"].split()):
        for rails in (1, 2):
            run_case(f"d", n, rails, {}, rails, rails * r)

keys = []
for row in rows:
    keys += [k for k in row if k not in keys]
with open(E["BR_CSV"], "w", newline="") as f:
    f.write(HEADER + "\n")
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
with open(E["BR_SUMMARY"], "w") as f:
    f.write(HEADER + "\n" + "\n".join(summary) + "\n")
print(HEADER)
print("\n".join(summary))
PY
