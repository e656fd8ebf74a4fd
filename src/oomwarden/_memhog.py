"""A test process: join a cgroup, set oom_score_adj, touch memory, wait.

usage: memhog.py CGROUP_PROCS SIZE_MIB|grow:SIZE_MIB ADJ

Prints "ready" once its memory is resident, then waits until stdin closes,
at most 120 s (it never outlives a test). "grow:N" allocates N MiB 8 MiB at a
time without announcing itself (it is meant to run into its cgroup's limit,
only ever inside a limited child cgroup), then waits the same way.
"""

import os
import sys
import time

procs, size, adj = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open("/proc/self/oom_score_adj", "w") as f:
    f.write(str(adj))
with open(procs, "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 120
chunks = []
if size.startswith("grow:"):
    for _ in range(int(size[5:]) // 8):
        chunks.append(b"\x01" * (8 << 20))
else:
    chunks.append(b"\x01" * (int(size) << 20))
    print("ready", flush=True)
import select  # noqa: E402

select.select([sys.stdin], [], [], max(0.0, deadline - time.monotonic()))
