#!/bin/sh
# A black box for tests that moves only when told: for each step I of N it waits until
# a file go<I> appears in its working directory, then writes step<I>.txt.
# usage: gate.sh [N]
n=${1:-3}
i=1
while [ "$i" -le "$n" ]; do
  while [ ! -e "go$i" ]; do sleep 0.02; done
  echo "step $i" > "step$i.txt"
  echo "step $i"
  i=$((i + 1))
done
