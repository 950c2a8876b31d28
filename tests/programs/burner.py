"""Burns about SECONDS of CPU and holds MB mebibytes, then exits 0."""
import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.3
mb = int(sys.argv[2]) if len(sys.argv) > 2 else 40
hold = bytearray(mb * 1024 * 1024)
for i in range(0, len(hold), 4096):
    hold[i] = 1
end = time.process_time() + seconds
x = 0
while time.process_time() < end:
    x += 1
