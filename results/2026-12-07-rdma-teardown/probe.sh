#!/bin/bash
# runs inside the guest
BIN=/work/wt/guest-time/target/debug/shardcast
W=/tmp/probe; rm -rf $W; mkdir -p $W/src
head -c $((3<<20)) /dev/urandom > $W/src/a.bin
t0=$EPOCHREALTIME
ts() { echo "$(bc <<<"$EPOCHREALTIME - $t0") $*"; }
$BIN serve --listen $RXEVM_IP:7071 --root $W/r0 --rdma-device $RXEVM_DEV --gid-index $RXEVM_GID --transport rdma 2>$W/serve.log &
SP=$!
rxevm_wait_listen 7071 20
ts "serve up pid $SP"
$BIN push $W/src --name x --version 1 --to $RXEVM_IP:7071 --rdma-device $RXEVM_PEER_DEV --gid-index $RXEVM_PEER_GID --transport rdma --chunk-size 1M > $W/push.out 2>&1
ts "push done rc $?"
for i in $(seq 1 8); do
  ts "--- sample $i"
  for t in /proc/$SP/task/*; do
     read -r st < $t/stat; s=(${st##*) }); echo "  tid ${t##*/} state ${s[0]} wchan $(cat $t/wchan 2>/dev/null)"
  done
  grep -h . /proc/$SP/task/*/stack 2>/dev/null | sort | uniq -c | sort -rn | head -12
  sleep 3
done
ts "kill"
kill -9 $SP; wait $SP
ts "reaped"
dmesg | tail -40
cat $W/serve.log | tail -5
