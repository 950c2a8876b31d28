#!/bin/sh
# A black box for tests: writes N step files, DELAY seconds apart, then exits CODE.
# usage: steps.sh [N] [DELAY] [CODE]
n=${1:-3}; d=${2:-0.1}; code=${3:-0}
i=1
while [ "$i" -le "$n" ]; do
  sleep "$d"
  echo "step $i" > "step$i.txt"
  echo "step $i"
  i=$((i + 1))
done
echo "done with $n steps" >&2
exit "$code"
