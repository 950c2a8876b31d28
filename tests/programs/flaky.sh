#!/bin/sh
# Fails (exit 1) on the first FAIL attempts, then succeeds; notes what it saw in its work dir.
fail=${1:-1}
ls > "seen-by-attempt-$SOAF_ATTEMPT.txt"
echo "attempt $SOAF_ATTEMPT" >> attempts.txt
if [ "$SOAF_ATTEMPT" -le "$fail" ]; then
  echo "failing on purpose in attempt $SOAF_ATTEMPT" >&2
  exit 1
fi
echo "fine in attempt $SOAF_ATTEMPT"
