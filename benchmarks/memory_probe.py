"""Where the many-clients case's GPU memory goes beyond centralized training (a diagnostic for benchmarks/gpu.py).

Prints the allocator's current and peak bytes around each phase of the first clients of a round.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402
from fedtune.train.step_runner import make_runner

MB = 1e6


def mark(what: str) -> None:
    print(f"{what:40s} now {torch.cuda.memory_allocated() / MB:8.1f} MB  peak {torch.cuda.max_memory_allocated() / MB:8.1f} MB",
          flush=True)


model = gpu.build("135m", torch.bfloat16)
mark("model built")
runner = make_runner(model, gpu.settings(4, 2), device=torch.device("cuda"), pad_id=gpu.PAD)
gpu.simulate(model, runner, 2, 2, 2, 4, 1, seed=5)
gpu.free()
torch.cuda.reset_peak_memory_stats()
mark("graph captured, peak reset")
t, _, peak = gpu.simulate(model, runner, 1, 1, 10, 4, 1, seed=8)
mark(f"centralized 10 steps (peak {peak:.3f} GB)")
gpu.free()
torch.cuda.reset_peak_memory_stats()
Client = gpu.fedpeft.FedPeftClient
orig_start = Client.start
count = [0]


def start(self, msg):
    count[0] += 1
    loud = count[0] <= 3
    if loud:
        mark(f"client {self.node_id}: start")
    reply = orig_start(self, msg)
    if loud:
        mark(f"client {self.node_id}: queued")

    def take():
        out = reply()
        if loud:
            mark(f"client {self.node_id}: reply taken")
        return out
    return take


Client.start = start
t, _, peak = gpu.simulate(model, runner, 1000, 100, 2, 4, 2, seed=9)
mark(f"federated 1000 clients (peak {peak:.3f} GB, {t:.1f} s)")
