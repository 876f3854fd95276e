"""Round-time speedup of the multi-process runtime over one GPU (issue 6).

Run on a host with 4 GPUs: ``python benchmarks/multigpu.py --out benchmarks/multigpu.json``. It writes
``multigpu_speedup_2`` and ``multigpu_speedup_4``: the median FedLLM round time on 1 GPU (the one-process
local runtime, `LocalGrid`) over the median round time on 2 and 4 GPUs (`runtime.distributed`, NCCL).

Every world size runs the real round loop (`fedpeft.serve`) and the real client apps (`fedpeft.make_clients`)
on a random-weight SmolLM2-135M-shaped Llama (speed does not depend on the weights), 40 clients per round,
synthetic token sequences. The first round is warm-up and left out of the median. The 1-GPU baseline encodes
and decodes every message as the default config does (``federation.serialize: true``); ``--no-serialize``
compares against handing them over as objects instead.

``--cpu`` is a smoke check of the same code on the CPU with gloo (a tiny Llama, 8 clients per round, world
sizes 1 and 2; one process gets all cores, N processes share them), writing ``cpu_gloo_speedup_2``: it shows
the runtime works end to end, not what GPUs would gain.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

import _common  # noqa: E402  (puts src/ on the path)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fedtune import config as cfg  # noqa: E402
from fedtune.context import RunContext  # noqa: E402
from fedtune.data.tasks import Example  # noqa: E402
from fedtune.experiment import Prepared  # noqa: E402
from fedtune.models import attach_lora  # noqa: E402
from fedtune.paradigms import fedpeft  # noqa: E402
from fedtune.progress import Bars  # noqa: E402
from fedtune.runtime import distributed  # noqa: E402
from fedtune.runtime.local import LocalGrid  # noqa: E402
from fedtune.strategies import FedAvg  # noqa: E402
from fedtune.runtime import free_port
from fedtune.rounds import ServerHooks
from fedtune.train.adapter import adapter_state

SHAPES = {"135m": _common.SHAPES["135m"],
          "tiny": {**_common.SHAPES["tiny"], "num_hidden_layers": 2}}  # the CPU smoke check's 2-layer toy
PAD = _common.PAD


def settings(a: argparse.Namespace) -> cfg.Config:
    return cfg.load(None, [
        f"model.device={'cpu' if a.cpu else 'auto'}", f"model.dtype={a.dtype}",
        f"federation.num_clients={a.clients}", f"federation.clients_per_round={a.clients}",
        f"federation.rounds={a.rounds}", f"train.local_steps={a.local_steps}", f"train.batch_size={a.batch_size}",
        "train.count_flops=false", "peft.r=16", "runtime.world_size=1",
    ])


def context(c: cfg.Config, a: argparse.Namespace, device: torch.device) -> RunContext:
    """The real client apps' context: a seeded random-weight model and synthetic examples (same on every rank)."""
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(**SHAPES[a.shape], max_position_embeddings=2048)).to(
            getattr(torch, c.model.dtype))
    base.requires_grad_(False)
    model = attach_lora(base, c.peft, c.seed)
    rng = random.Random(0)
    vocab = SHAPES[a.shape]["vocab_size"]
    train = [Example([rng.randrange(1, vocab) for _ in range(a.seq - 1)], [rng.randrange(1, vocab)])
             for _ in range(a.clients * a.examples_per_client)]
    parts = [list(range(i * a.examples_per_client, (i + 1) * a.examples_per_client)) for i in range(a.clients)]
    data = Prepared(task=None, train=train, test=[], parts=parts, keys=["-"] * len(train))
    quiet = Bars(quiet=True)
    return RunContext(config=c, model=model, tokenizer=SimpleNamespace(pad_token_id=PAD), data=data, device=device,
                      bars=quiet, log=lambda record: None, score=lambda: 0.0, path=Path("."))


def rank_main(rank: int, a: argparse.Namespace, world: int, port: int, result: str) -> None:
    """One process of a world: rank 0 times the rounds of `fedpeft.serve`, the others serve their clients."""
    c = settings(a)
    backend = "gloo" if a.cpu else "nccl"
    channel = None
    if world > 1:
        channel = distributed.init_rank(c, rank, rank, world, backend, f"tcp://127.0.0.1:{port}")
    device = torch.device("cpu") if a.cpu else torch.device("cuda", rank)
    ctx = context(c, a, device)
    apps = fedpeft.make_clients(ctx)
    if rank > 0:
        distributed.serve_worker(apps, channel)
        torch.distributed.destroy_process_group()
        return
    grid = LocalGrid(apps, serialize=a.serialize) if world == 1 else distributed.DistributedGrid(apps, channel)
    stamps: list[float] = []

    def log(record: dict) -> None:
        if record["type"] == "round":
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

    hooks = ServerHooks(evaluate=lambda s: 0.0, log=log, save=lambda s, r: None, bars=ctx.bars)
    start = time.perf_counter()
    fedpeft.serve(grid, adapter_state(ctx.model), FedAvg(), rounds=a.rounds, clients_per_round=a.clients,
                  seed=0, eval_every=a.rounds, hooks=hooks)
    if channel is not None:
        channel.stop()
        torch.distributed.destroy_process_group()
    seconds = [t1 - t0 for t0, t1 in zip([start] + stamps, stamps)]
    Path(result).write_text(json.dumps(seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="smoke check on the CPU with gloo (tiny model, worlds 1 and 2)")
    p.add_argument("--worlds", default=None, help="comma-separated world sizes (default 1,2,4; --cpu: 1,2)")
    p.add_argument("--clients", type=int, default=None, help="clients per round (default 40; --cpu: 8)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per world size; the first is warm-up")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default 256; --cpu: 32)")
    p.add_argument("--examples-per-client", type=int, default=32)
    p.add_argument("--no-serialize", dest="serialize", action="store_false",
                   help="1 GPU baseline hands messages over as objects (federation.serialize=false) instead of "
                        "encoding them (the default config)")
    p.add_argument("--out", default="benchmarks/multigpu.json")
    a = p.parse_args()
    a.shape = "tiny" if a.cpu else "135m"
    a.dtype = "float32" if a.cpu else "bfloat16"
    a.clients = a.clients or (8 if a.cpu else 40)
    a.seq = a.seq or (32 if a.cpu else 256)
    worlds = [int(w) for w in (a.worlds or ("1,2" if a.cpu else "1,2,4")).split(",")]
    if not a.cpu and max(worlds) > torch.cuda.device_count():
        sys.exit(f"world sizes {worlds} need {max(worlds)} GPUs; this machine has {torch.cuda.device_count()} "
                 "(pass --worlds, or --cpu for the CPU smoke check)")
    prefix = "cpu_gloo" if a.cpu else "multigpu"
    results: dict = {"shape": a.shape, "clients_per_round": a.clients, "local_steps": a.local_steps,
                     "batch_size": a.batch_size, "seq": a.seq, "rounds": a.rounds, "baseline_serialize": a.serialize, "torch": torch.__version__,
                     "device": "cpu" if a.cpu else torch.cuda.get_device_name(0)}
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out = Path(tmp) / f"w{world}.json"
            mp.spawn(rank_main, args=(a, world, free_port(), str(out)), nprocs=world, join=True)
            seconds = json.loads(out.read_text())
            medians[world] = statistics.median(seconds[1:] or seconds)
            results[f"{prefix}_round_seconds_{world}"] = seconds
            print(f"world {world}: rounds {[round(s, 3) for s in seconds]} s, median after warm-up "
                  f"{medians[world]:.3f} s", flush=True)
    for world in worlds:
        if world > 1 and 1 in medians:
            results[f"{prefix}_speedup_{world}"] = medians[1] / medians[world]
            print(f"{prefix}_speedup_{world} = {results[f'{prefix}_speedup_{world}']:.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
