"""Time the per-step stop agreement of the training engine: one all-reduce (MAX) of one int64.

Every optimizer step, the processes of a run agree whether to stop (a signal to any of them, or
the time limit) with ``torch.distributed.all_reduce`` of a one-element tensor
(``swintormer/core/training.py``, ``_Engine._stop_reason``). This tool starts ``--processes``
CPU processes in a gloo group (as ``accelerate launch --multi_gpu`` does on a machine without
a GPU), times ``--repeats`` such all-reduces after a warm-up, and prints the median and the
90th percentile per call, to set against a training step's time.

    OMP_NUM_THREADS=1 python tools/benchmark_stop_flag.py --processes 2 --repeats 2000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path


def _worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    flag = torch.zeros(1, dtype=torch.int64)
    for _ in range(50):  # warm-up
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    times = []
    for index in range(repeats):
        flag.fill_(1 if (index == repeats - 1 and rank == world - 1) else 0)
        start = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        times.append(time.perf_counter() - start)
    assert value == 1  # the last round's flag of one process reached every process
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes in the group (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2000, help="timed all-reduces (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)

    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "times.json")
        mp.spawn(_worker, args=(args.processes, port, args.repeats, out), nprocs=args.processes, join=True)
        times = sorted(json.loads(Path(out).read_text()))
    result = {"processes": args.processes, "repeats": args.repeats,
              "median_us": round(statistics.median(times) * 1e6, 1),
              "p90_us": round(times[int(0.9 * (len(times) - 1))] * 1e6, 1),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count()}
    print(f"stop-flag all-reduce, {args.processes} gloo processes: median {result['median_us']} µs, "
          f"90th percentile {result['p90_us']} µs per step ({args.repeats} calls)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
