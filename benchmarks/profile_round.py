"""Where a simulated FedLLM round spends its host time (cProfile), on a CUDA GPU: a diagnostic for benchmarks/gpu.py."""

import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402
from fedtune.train.step_runner import make_runner

shape = sys.argv[1] if len(sys.argv) > 1 else "135m"
model = gpu.build(shape, torch.bfloat16)
runner = gpu.make_runner(model, gpu.settings(4, 10), device=torch.device("cuda"), pad_id=gpu.PAD)
gpu.simulate(model, runner, 2, 2, 2, 4, 1, seed=5)
prof = cProfile.Profile()
prof.enable()
t, tokens, _ = gpu.simulate(model, runner, 10, 10, 10, 4, 1, seed=6)
prof.disable()
print(f"round {t:.2f} s, {tokens / t:.0f} tokens/s")
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
