#!/bin/bash
set -e
cd "$(dirname "$0")/../.."
export SC_CLUSTER=sc
C=scripts/cluster.sh
B=${BIN:-$PWD/target/release/shardcast}
W=$(mktemp -d /dev/shm/rails-trial.XXXX)  # run as: flock /tmp/sc-netns.lock flock /tmp/sc-bench.lock results/2026-12-06-rails/trial-c.sh
$C up 2 --rate 1gbit --mtu 1500 --rails 2 --ingress >/dev/null
head -c 512M /dev/urandom > $W/src.bin
pids=()
for k in 1 2; do
  a0=$($C addr r$k 0); a1=$($C addr r$k 1)
  ip netns exec sc-r$k env NO_COLOR=1 $B serve --listen $a0:7071 --root $W/r$k --rail $a0 --rail $a1 2>$W/r$k.log >/dev/null & pids+=($!)
done
sleep 1
t0=$(date +%s.%N)
ip netns exec sc-p env NO_COLOR=1 RUST_LOG=shardcast=debug $B push $W/src.bin --name t --version 1 --to $($C addr r1 0):7071,$($C addr r2 0):7071 --lanes 2 --rail 10.77.0.10 --rail 10.77.1.10 --json > $W/push.json 2> $W/push.log &
pp=$!
sleep 1.2
echo "rail-down at $(date -u +%T.%N)"
for n in p r1 r2; do $C rail-down $n 1; done
echo "rail-down done $(date -u +%T.%N)"
wait $pp || true
echo "push end $(date -u +%T.%N)"
for n in p r1 r2; do $C rail-up $n 1; done
kill ${pids[@]}; wait || true
sed 's/\x1b\[[0-9;]*m//g' $W/push.log | grep -v "^$" | cut -c1-230 | tail -30
for k in 1 2; do echo == r$k; sed 's/\x1b\[[0-9;]*m//g' $W/r$k.log | grep -E "receiving|superseded|resum|published|lost|abort" | cut -c1-200; done
$C down >/dev/null
rm -rf $W
