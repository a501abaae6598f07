"""One rank of tests/test_distributed.py: bind to the cores in argv[1] (comma-separated, 'all' for none), start
gloo from the environment, print this rank's cpu_threads_per_rank as JSON."""
import json
import os
import sys

import torch.distributed as dist

from megatron_ast import distributed

if sys.argv[1] != "all":
    os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
dist.init_process_group("gloo")
print(json.dumps({"rank": dist.get_rank(), "cores": len(os.sched_getaffinity(0)),
                  "threads": distributed.cpu_threads_per_rank()}), flush=True)
dist.destroy_process_group()
