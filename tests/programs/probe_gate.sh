#!/bin/sh
# A black box for the progress probes that moves only when told: for each step I of N it
# waits until a file go<I> appears, then writes out/chunk_<I>.json, prints "step I of N"
# and rewrites progress.txt with "I/N".
# usage: probe_gate.sh N
n=${1:-3}
mkdir -p out
i=1
while [ "$i" -le "$n" ]; do
  while [ ! -e "go$i" ]; do sleep 0.02; done
  echo "{}" > "out/chunk_$i.json"
  echo "step $i of $n"
  echo "$i/$n" > progress.tmp && mv progress.tmp progress.txt
  i=$((i + 1))
done
