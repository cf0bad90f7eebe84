#!/usr/bin/env bash
# CPU of the replica and the primary during one 1 GiB loopback push, 1 lane then 2 lanes.
set -euo pipefail
BIN=/work/wt/lanes/target/release/shardcast
w=$(mktemp -d /dev/shm/lanes-cpu.XXXXXX); trap 'kill $spid 2>/dev/null; rm -rf $w' EXIT
head -c 1073741824 /dev/urandom > $w/src.bin
$BIN serve --listen 127.0.0.1:0 --root $w/root > $w/serve.log 2>&1 & spid=$!
for i in $(seq 50); do grep -q "listening" $w/serve.log && break; sleep 0.1; done
addr=$(grep -o "listening on [0-9.:]*" $w/serve.log | head -1 | awk '{print $3}')
[[ -n "$addr" ]] || { cat $w/serve.log; exit 1; }
v=0
for lanes in 1 2 1 2; do
  v=$((v+1))
  s0=$(awk '{print $14+$15}' /proc/$spid/stat)
  /usr/bin/time -f "push cpu_s=%U+%S wall_s=%e" $BIN push $w/src.bin --name b --version $v --to $addr --lanes $lanes --json > $w/out.json 2> $w/time.txt
  s1=$(awk '{print $14+$15}' /proc/$spid/stat)
  secs=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["seconds"], d["gbps"], d["lane_chunks"])' $w/out.json)
  echo "lanes=$lanes push(seconds gbps lane_chunks)=$secs $(tail -1 $w/time.txt) serve_cpu_s=$(python3 -c "print(($s1-$s0)/$(getconf CLK_TCK))")"
  rm -rf $w/root/b/$v
done
