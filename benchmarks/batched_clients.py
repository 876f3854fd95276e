"""Micro-benchmark: K FedLLM clients trained in one batched pass vs one after another.

Measures client-steps per second of the real client code (`FedPeftClient` one by one, sharing one
`StepRunner` as a simulation's clients do, and `fedtune.multilora.BatchedFedPeft` for all K at once)
on random-weight models of two sizes. On CUDA both run as captured CUDA graphs (train.cuda_graphs):
the sequential path one graph replay per client step, the batched path one replay per K-client step.

* ``smollm2``: SmolLM2-135M's architecture (hidden 576, 30 layers, 9 heads / 3 KV heads,
  intermediate 1536, vocab 49152, tied embeddings);
* ``tiny``: the test suite's tiny-llama (hidden 64, 2 layers).

Speed does not depend on the weights, and random ones need no download. Each client has its
own random sequences of about ``--seq`` tokens (lengths vary, so batches carry padding) whose
last ``--target`` tokens are the training targets. It also prints the largest difference between
a client's gradient in the batched pass and the same client's gradient alone (one eager step), and
the largest difference between a client's adapter after a whole round batched and alone (the paths
as timed, graphs included) next to the largest change a round makes to the adapter.

    python benchmarks/batched_clients.py --device cpu --models tiny --clients 4 --batch-sizes 1 2 --seq 64
    python benchmarks/batched_clients.py --device cuda --dtype bfloat16             # the full sweep
    python benchmarks/batched_clients.py --device cuda --dtype bfloat16 --models smollm2 --clients 8 16 \
        --batch-sizes 1 4 --json batched.json                                        # batched_clients_speedup

Run from the repository root with ``PYTHONPATH=src``. Timings are wall-clock around whole client
rounds (adapter load, optimizer, steps, reply), with CUDA synchronised before and after (CUDA events
time the GPU work in the same interval); the first round of each setting is a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.config import PeftConfig
from fedtune.data.tasks import Example, collate
from fedtune.train.losses import lm_loss
from fedtune.models import DTYPES, attach_lora, tiny_llama_config
from fedtune.train.stacked_lora import StackedLora, combine, lora_layers
from fedtune.paradigms.fedpeft_batched import BatchedFedPeft
from fedtune.paradigms.fedpeft import FedPeftClient, TrainSettings, adapter_state, load_adapter_state, make_runner
from fedtune.wire import Message

VOCAB = 49152
PAD = 0


def model_config(name: str) -> LlamaConfig:
    if name == "tiny":
        return tiny_llama_config(VOCAB)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def build(name: str, device: torch.device, dtype: torch.dtype, rank: int):
    cfg = model_config(name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return attach_lora(base, PeftConfig(r=rank, alpha=2 * rank), seed=0)


def client_examples(k: int, n: int, seq: int, target: int, seed: int) -> list[list[Example]]:
    """k clients with n random sequences each, of seq minus up to seq/8 tokens, the last `target` as targets."""
    rng = random.Random(seed)
    out = []
    for _ in range(k):
        rows = []
        for _ in range(n):
            length = seq - rng.randrange(seq // 8 + 1)
            ids = [rng.randrange(1, VOCAB) for _ in range(length)]
            rows.append(Example(ids[:-target], ids[-target:]))
        out.append(rows)
    return out


class Timer:
    """Wall-clock seconds of a block, CUDA synchronised at both ends; on CUDA also the events' GPU time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize()
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end_event.record()
            torch.cuda.synchronize()
            self.gpu_seconds = self.start_event.elapsed_time(self.end_event) / 1000
        self.seconds = time.perf_counter() - self.start


def max_grad_difference(model, examples: list[list[Example]], batch: int) -> tuple[float, float]:
    """(largest |batched - alone| over every client's LoRA gradient, largest |gradient|) on one batch each."""
    g = torch.Generator().manual_seed(1)
    init = adapter_state(model)
    states = [{k: v + 0.02 * torch.randn(v.shape, generator=g).to(v) for k, v in init.items()} for _ in examples]
    per_client = [collate(rows[:batch], PAD) for rows in examples]
    device = next(model.parameters()).device
    model.train()
    named = dict(model.named_parameters())
    alone = []
    for state, b in zip(states, per_client):
        load_adapter_state(model, state)
        model.zero_grad(set_to_none=True)
        loss, _ = lm_loss(model, {k: v.to(device) for k, v in b.items()})
        loss.backward()
        alone.append({(name, ab): named[f"{name}.lora_{ab}.{model.active_adapter}.weight"].grad.float().clone()
                      for name in lora_layers(model) for ab in "AB"})
    model.zero_grad(set_to_none=True)
    stacked = StackedLora(model, states)
    combined, routing = combine(per_client, PAD, device=device)
    with stacked:
        loss, _ = stacked.loss(combined, routing)
        loss.backward()
    model.eval()
    diff = top = 0.0
    for slot, grads in enumerate(alone):
        for (name, ab), grad in grads.items():
            mine = (stacked.A if ab == "A" else stacked.B)[name].grad[slot].float()
            diff = max(diff, float((mine - grad).abs().max()))
            top = max(top, float(grad.abs().max()))
    load_adapter_state(model, init)
    return diff, top


def bench(model, k: int, batch: int, args, device: torch.device) -> dict:
    examples = client_examples(k, max(batch * args.steps, batch), args.seq, args.target, seed=k * 100 + batch)
    settings = TrainSettings(local_steps=args.steps, local_epochs=None, batch_size=batch, lr=1e-4, count_flops=False,
                             compile=args.compile)
    runner = make_runner(model, settings, device=device, pad_id=PAD)  # shared, as `fedpeft.make_clients` does
    apps = {i: FedPeftClient(i, model, rows, settings, device=device, pad_id=PAD, seed=0, runner=runner)
            for i, rows in enumerate(examples)}
    batched = BatchedFedPeft(apps, static={"auto": None, "eager": False, "static": True}[args.batched_path])
    init = adapter_state(model)

    def messages(rnd: int) -> list[Message]:
        return [Message(init, {"kind": "fit_ins", "round": rnd, "dst": i}) for i in apps]

    def one_by_one(rnd: int) -> None:
        for m in messages(rnd):
            apps[int(m.meta["dst"])](m)

    def together(rnd: int) -> None:
        batched(messages(rnd))

    result = {"model": args.model_name, "clients": k, "batch": batch, "seq": args.seq, "steps": args.steps}
    for label, fn in (("sequential", one_by_one), ("batched", together)):
        fn(1)  # warm-up: allocator, kernels, autotuning, graph capture (rounds count from 1)
        with Timer(device) as t:
            for rnd in range(2, args.rounds + 2):
                fn(rnd)
        result[f"{label}_steps_per_s"] = k * args.steps * args.rounds / t.seconds
        if device.type == "cuda":
            result[f"{label}_gpu_seconds"] = t.gpu_seconds
    result["ratio"] = result["batched_steps_per_s"] / result["sequential_steps_per_s"]
    result["max_grad_diff"], result["max_grad"] = max_grad_difference(model, examples, batch)
    # The same round both ways, as timed: how far apart the adapters end, next to how far a round moves them.
    alone = [apps[int(m.meta["dst"])](m) for m in messages(args.rounds + 1)]
    together_replies = batched(messages(args.rounds + 1))
    result["max_adapter_diff"] = max(float((a.tensors[key] - b.tensors[key]).abs().max())
                                     for a, b in zip(alone, together_replies) for key in init)
    result["max_update"] = max(float((a.tensors[key] - init[key]).abs().max()) for a in alone for key in init)
    static = batched.passes.get(k)
    result["batched_path"] = "eager" if static is None else ("graphs" if static[1].captured_shapes else "static")
    result["graph_failure"] = static[1].graph_failure if static is not None else None
    result["sequential_graphs"] = runner.captured_shapes
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # This setting's graphs and their memory pools go before the next setting captures its own.
        del apps, batched, runner
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the base weights")
    ap.add_argument("--models", nargs="+", choices=["smollm2", "tiny"], default=["smollm2", "tiny"])
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 8, 16], help="K: clients per batched pass")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4], help="sequences per client step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (up to; lengths vary by 1/8)")
    ap.add_argument("--target", type=int, default=16, help="target tokens at the end of each sequence")
    ap.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (q,k,v,o projections)")
    ap.add_argument("--batched-path", choices=["auto", "eager", "static"], default="auto",
                    help="the batched pass: auto (static with CUDA graphs on CUDA, eager on the CPU), or forced")
    ap.add_argument("--compile", action="store_true", help="torch.compile the static step (both paths; CUDA)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU: use --device cpu")
    if args.seq <= args.target + args.seq // 8:
        raise SystemExit(f"--seq {args.seq} leaves no prompt before --target {args.target} tokens: raise --seq")
    results = []
    print(f"{'model':8} {'K':>3} {'b':>2} {'seq':>4} {'seq steps/s':>12} {'batched steps/s':>16} {'ratio':>6} "
          f"{'max |dgrad|':>12} {'max |grad|':>10} {'max |dadapter|':>14} {'max |update|':>12} {'path':>6}")
    for name in args.models:
        args.model_name = name
        model = build(name, device, DTYPES[args.dtype], args.rank)
        for k in args.clients:
            for b in args.batch_sizes:
                r = bench(model, k, b, args, device)
                results.append(r)
                print(f"{name:8} {k:>3} {b:>2} {args.seq:>4} {r['sequential_steps_per_s']:>12.1f} "
                      f"{r['batched_steps_per_s']:>16.1f} {r['ratio']:>6.2f} {r['max_grad_diff']:>12.2e} "
                      f"{r['max_grad']:>10.2e} {r['max_adapter_diff']:>14.2e} {r['max_update']:>12.2e} "
                      f"{r['batched_path']:>6}", flush=True)
                if r["graph_failure"]:
                    print(f"  graph capture failed: {r['graph_failure']}", flush=True)
        model.unload()
        del model
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
            "torch": torch.__version__, "compile": args.compile,
            "batched_path": args.batched_path}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
