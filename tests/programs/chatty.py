"""Prints about BYTES bytes of numbered lines to stdout, then 'END <last number>'."""
import sys

total = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
out = sys.stdout
written = 0
n = 0
while written < total:
    line = f"line {n:09d} " + "x" * 80 + "\n"
    out.write(line)
    written += len(line)
    n += 1
out.write(f"END {n - 1}\n")
sys.stderr.write("chatty done\n")
