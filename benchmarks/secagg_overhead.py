"""What secure aggregation (Flower's SecAgg+, ``secagg.enabled``) costs per round against plain FedAvg, on the CPU.

One round's exchange and average, without training: each client answers ``fit_ins`` with a fixed adapter state
(the global one plus a small update), so the figures are the protocol's own. Plain FedAvg sends the global
adapter down and each client's adapter up through the local runtime's wire encoding, then takes the weighted
mean; secure aggregation runs the four SecAgg+ stages through `fedtune.secagg_server.SecAggServer` over the same
grid. Bytes are the exact encoded sizes of the messages (per client and round, down and up); time is wall time
of the whole round, the median of ``--reps`` rounds.

Adapter shapes: LoRA r=8 on q, k, v, o (fedtune's default ``peft`` section) of the benchmarks' ``tiny`` Llama
and of SmolLM2-135M (30 layers, hidden 576, 3 KV heads of 64: 921,600 parameters).

    python benchmarks/secagg_overhead.py --out benchmarks/secagg_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import _common  # noqa: F401  (puts src/ first on sys.path)
import torch
from _common import SHAPES

from fedtune.grid import FunctionApp, exchange
from fedtune.rounds import aggregate, screen_reply
from fedtune.runtime.local import LocalGrid
from fedtune.secagg import SecAggClient, SecAggConfig
from fedtune.secagg_server import SecAggServer
from fedtune.strategies import FedAvg
from fedtune.wire import Message, check, encoded_size, spec_of

CASES = [("tiny", 5, 1.0), ("tiny", 10, 1.0), ("135m", 5, 1.0), ("135m", 10, 1.0), ("135m", 10, 0.5)]
"""(adapter shape, clients per round, secagg.num_shares)."""


def lora_state(shape: str, r: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA r=`r` adapter on q, k, v, o of every layer of `shape`, with PEFT's tensor names."""
    s = SHAPES[shape]
    h, kv = s["hidden_size"], s["hidden_size"] // s["num_attention_heads"] * s["num_key_value_heads"]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(s["num_hidden_layers"]):
        for name, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            state[f"{prefix}.lora_A.weight"] = 0.04 * torch.randn(r, h, generator=g)
            state[f"{prefix}.lora_B.weight"] = 0.01 * torch.randn(out, r, generator=g)
    return state


def clients(global_state, n: int, secure: bool) -> dict[int, object]:
    g = torch.Generator().manual_seed(1)
    apps = {}
    for i in range(n):
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in global_state.items()}
        reply = Message(state, {"kind": "fit_res", "num_examples": 100 + 10 * i, "train_loss": 1.0})
        app = FunctionApp(lambda msg, reply=reply: reply)
        apps[i] = SecAggClient(app, i) if secure else app
    return apps


def plain_round(grid, global_state, nodes, rnd):
    """FedLLM's plain round (fedpeft.serve without training): bytes down, bytes up per client, aggregated."""
    expect = spec_of(global_state)
    messages = [Message(global_state, {"kind": "fit_ins", "round": rnd, "dst": n}) for n in nodes]
    down = [encoded_size(m) for m in messages]
    updates, up = [], []
    for reply in exchange(grid, messages, lambda n: None):
        up.append(encoded_size(reply))
        _, update = screen_reply(reply, lambda r: check(r, expect))
        updates.append(update)
    aggregate(FedAvg(), global_state, updates, min_replies=1)
    return sum(down) / len(nodes), sum(up) / len(nodes)


def run_case(shape: str, n: int, num_shares: float, reps: int) -> dict:
    global_state = lora_state(shape)
    params = sum(t.numel() for t in global_state.values())
    nodes = list(range(n))
    plain_grid = LocalGrid(clients(global_state, n, secure=False))
    plain_times = []
    for rnd in range(1, reps + 1):
        t = time.perf_counter()
        down, up = plain_round(plain_grid, global_state, nodes, rnd)
        plain_times.append(time.perf_counter() - t)
    server = SecAggServer(SecAggConfig(enabled=True, num_shares=num_shares), max_num_examples=1000)
    secure_grid = LocalGrid(clients(global_state, n, secure=True))
    secure_times, stages = [], []
    for rnd in range(1, reps + 1):
        records = []
        t = time.perf_counter()
        _, summed, aggregated, note = server.round(secure_grid, rnd, nodes, global_state, FedAvg(), log=records.append)
        secure_times.append(time.perf_counter() - t)
        assert aggregated and summed == n, note
        (sa,) = [r for r in records if r["type"] == "secagg"]
        stages.append(sa)
    last = stages[-1]
    s_down = sum(s["bytes_down"] for s in last["stages"].values()) / n
    s_up = sum(s["bytes_up"] for s in last["stages"].values()) / n
    plain_s, secure_s = statistics.median(plain_times), statistics.median(secure_times)
    return {
        "adapter": shape, "parameters": params, "clients": n, "num_shares": last["num_shares"],
        "threshold": last["threshold"],
        "plain": {"bytes_down": down, "bytes_up": up, "seconds": plain_s},
        "secagg": {"bytes_down": s_down, "bytes_up": s_up, "seconds": secure_s,
                   "stages": {k: {"bytes_down": v["bytes_down"] / n, "bytes_up": v["bytes_up"] / n,
                                  "seconds": statistics.median(s["stages"][k]["seconds"] for s in stages)}
                              for k, v in last["stages"].items()}},
        "bytes_up_ratio": s_up / up, "bytes_down_ratio": s_down / down, "time_ratio": secure_s / plain_s,
        "seconds_overhead": secure_s - plain_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--reps", type=int, default=3, help="rounds per case (the median time is reported)")
    ap.add_argument("--cases", default=None, help="only these cases, e.g. tiny:5:1.0,135m:10:0.5")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = CASES if not args.cases else [(s, int(n), float(f)) for s, n, f in (c.split(":") for c in args.cases.split(","))]
    results = []
    for shape, n, shares in cases:
        r = run_case(shape, n, shares, args.reps)
        results.append(r)
        print(f"{shape:5s} {r['parameters']:>8,} params  {n:2d} clients  {r['num_shares']:2d} shares | "
              f"per client: plain {r['plain']['bytes_down'] / 1e6:.3f} MB down {r['plain']['bytes_up'] / 1e6:.3f} MB up, "
              f"secagg {r['secagg']['bytes_down'] / 1e6:.3f} down {r['secagg']['bytes_up'] / 1e6:.3f} up "
              f"(x{r['bytes_up_ratio']:.2f} up) | round: plain {r['plain']['seconds']:.2f} s, "
              f"secagg {r['secagg']['seconds']:.2f} s (x{r['time_ratio']:.1f})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": "cpu", "torch_threads": 1, "machine": platform.processor() or platform.machine(),
                       "reps": args.reps, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
