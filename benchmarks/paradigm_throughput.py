"""Throughput of the KD and split paradigms beside FedLLM's, same model, batch, sequence and steps (issue 5).

    python benchmarks/paradigm_throughput.py --device cuda --shape 135m   # GPU figures (gpu.py runs these too)
    python benchmarks/paradigm_throughput.py --device cpu --shape tiny    # CPU smoke test, a few seconds

Each case builds the random-weight Llama of `_common.build` (``tiny``: a 4-layer toy for the CPU), gives 10
clients random full-sequence language-modelling examples and runs two rounds of 10 clients x 10 local steps
through the paradigm's own code (`fedpeft.serve`, `kd.serve`, `split.serve` with their client apps) on a
`LocalGrid` with ``serialize=False``. The second round is timed (the first warms up: CUDA graphs captured,
kernels chosen, and KD's soft labels exist, so its clients distil too), from the end of round 1 to the end of
round 2, the device synchronised at both ends.

* ``tokens_per_s``: client training tokens (10 clients x 10 steps x batch x seq, as the clients report in
  ``examples_seen``) over the round's seconds: the figure FedLLM's ``throughput`` case reports.
* ``ratio_to_fedllm``: that over FedLLM's own tokens/s, measured in the same process on the same shapes.
* KD also reports its distillation separately: the clients' distillation tokens (``kd.distill_steps`` steps of
  public prompts each), the tokens of their reply (logits of the whole public set, inference) and the server's
  distillation tokens (``kd.server_steps`` steps); they are inside the round's seconds, not in ``tokens_per_s``.
* Split: the cut is the middle block; activations and gradients travel in the model's dtype; the main server's
  top steps are inside the round's seconds (every client step is one top step).
* ``client_s`` and ``server_s``: the clients' own metered seconds and the server's (KD: its distillation; split:
  the main server's top steps) inside ``round_s``; the rest is messages, validation and adapter swaps.
* KD and split run their steps on the fast path (`fedtune.train.graphed`: static shapes, per-shape CUDA graphs)
  since ``train.cuda_graphs`` is on, as FedLLM runs on `StepRunner`; ``graphed_shapes`` counts their graphs.

Nothing here needs CUDA unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable from tests/ too

import _common as common  # noqa: E402  (also puts src/ on the path)

from fedtune.data.tasks import Example  # noqa: E402
from fedtune.paradigms import fedpeft, kd, split  # noqa: E402
from fedtune.progress import Bars  # noqa: E402
from fedtune.runtime.local import LocalGrid  # noqa: E402
from fedtune.split_model import CLIENT, Cut, MainServer  # noqa: E402
from fedtune.split_session import Activations, LocalMainServer  # noqa: E402
from fedtune.strategies import FedAvg  # noqa: E402
from fedtune.rounds import ServerHooks
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings
from fedtune.train.step_runner import make_runner

CLIENTS = 10
STEPS = 10
SEED = 0
KD_PUBLIC_PROMPTS = 32  # prompts in KD's public set
KD_DISTILL_STEPS = 4  # kd.distill_steps default
KD_SERVER_STEPS = 10  # kd.server_steps default
KD_TOP_K = 8  # kd.top_k default


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        common.free()


def client_data(vocab: int, batch: int, seq: int) -> list[list[Example]]:
    """Per client, 2 x batch random sequences of `seq` tokens, every token after the first a target."""
    g = torch.Generator().manual_seed(SEED + 6)
    return [common.as_examples(torch.randint(1, vocab, (batch * 2, seq), generator=g)) for _ in range(CLIENTS)]


class RoundClock:
    """`ServerHooks` whose log timestamps the end of each round (device synchronised) and keeps the records."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: dict[int, float] = {}
        self.records: list[dict] = []
        self.hooks = ServerHooks(evaluate=lambda state: 0.0, log=self._log, save=lambda state, rnd: None,
                                         bars=Bars(quiet=True))

    def _log(self, record: dict) -> None:
        if record["type"] == "round":
            sync(self.device)
            self.ends[record["round"]] = time.perf_counter()
        self.records.append(record)

    def losses(self) -> list[float]:
        """Every client's first and last training loss and distillation loss, and the server's, in order."""
        keys = ("train_loss_first", "train_loss_last", "distill_loss")
        return [r[k] for r in self.records if r["type"] in ("client", "server") for k in keys if r.get(k) is not None]

    def timed_round(self, tokens_per_example: int) -> dict:
        """Seconds, client training tokens and tokens/s of round 2; every client must have trained."""
        clients = [r for r in self.records if r["type"] == "client" and r["round"] == 2]
        bad = [r for r in clients if r.get("status") != "ok"]
        assert len(clients) == CLIENTS and not bad, f"round 2 clients did not all train: {bad[:1]}"
        seconds = self.ends[2] - self.ends[1]
        tokens = sum(r["examples_seen"] for r in clients) * tokens_per_example
        # Where the round's time goes: the clients' own metered work, the server's (KD: its distillation; split:
        # the main server's top steps), and the rest (messages, validation, adapter swaps, scheduling).
        client_s = sum(r.get("seconds") or 0.0 for r in clients)
        server_s = sum(r.get("seconds") or 0.0 for r in self.records if r["type"] == "server" and r["round"] == 2)
        return {"round_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "client_s": client_s,
                "server_s": server_s}


def settings(batch: int, graphs: bool = True) -> TrainSettings:
    """The clients' settings; ``graphs=False`` runs KD's and split's static steps eagerly (the check's reference)."""
    return TrainSettings(local_steps=STEPS, local_epochs=None, batch_size=batch, lr=common.LR, count_flops=False,
                         cuda_graphs=graphs, static_steps=None if graphs else True)


def model_for(shape: str, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return common.build(shape, dtype, device=str(device), seed=SEED)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------- the three paradigms


def fedllm_round(shape: str, batch: int, seq: int, device: torch.device) -> dict:
    """FedLLM (LoRA + FedAvg) as `fedpeft.make_clients` wires it: one shared model and step runner."""
    model = model_for(shape, device)
    s = settings(batch)
    runner = make_runner(model, s, device=device, pad_id=common.PAD)
    data = client_data(model.get_input_embeddings().weight.shape[0], batch, seq)
    apps = {i: fedpeft.FedPeftClient(i, model, data[i], s, device=device, pad_id=common.PAD, seed=SEED, runner=runner)
            for i in range(CLIENTS)}
    clock = RoundClock(device)
    reset_peak(device)
    fedpeft.serve(LocalGrid(apps, serialize=False), adapter_state(model), FedAvg(), rounds=2,
                  clients_per_round=CLIENTS, seed=SEED, eval_every=10**9, hooks=clock.hooks)
    out = {**clock.timed_round(seq), "peak_gb": peak_gb(device)}
    del model, runner, apps
    free(device)
    return out


def kd_round(shape: str, batch: int, seq: int, device: torch.device, graphs: bool = True) -> dict:
    """KD-FedLLM: clients distil toward the soft labels, train, reply with top-k logits; the server distils."""
    model = model_for(shape, device)
    vocab = model.get_input_embeddings().weight.shape[0]
    s = settings(batch, graphs)
    g = torch.Generator().manual_seed(SEED + 2)
    prompt_len = max(2, seq // 4)
    public = kd.PublicSet([Example(prompt_ids=row.tolist(), target_ids=[])
                           for row in torch.randint(1, vocab, (KD_PUBLIC_PROMPTS, prompt_len), generator=g)],
                          "topk", [], [], vocab, KD_TOP_K, 1.0, batch, common.PAD)
    public.spans = kd.distill_spans(public.examples)
    public.__post_init__()  # the rows follow the spans
    data = client_data(vocab, batch, seq)
    init = adapter_state(model)
    apps = {i: kd.KDClient(i, model, data[i], public, s, init, distill_steps=KD_DISTILL_STEPS, device=device,
                           pad_id=common.PAD, seed=SEED) for i in range(CLIENTS)}
    clock = RoundClock(device)
    reset_peak(device)
    kd.serve(LocalGrid(apps, serialize=False), public, model, init, s, server_steps=KD_SERVER_STEPS, rounds=2,
             clients_per_round=CLIENTS, seed=SEED, eval_every=10**9, device=device, hooks=clock.hooks)
    out = {**clock.timed_round(seq), "losses": clock.losses()}
    fast = kd.fast_for(model, public, s, device)
    out["graphed_shapes"] = None if fast is None else {
        "train": fast.train.captured, "distil": fast.distil.captured, "logits": fast.logits.captured,
        "failures": [f.failure for f in (fast.train, fast.distil, fast.logits) if f.failure]}
    clients = [r for r in clock.records if r["type"] == "client" and r["round"] == 2]
    distill_steps = sum(r["distill_steps"] for r in clients)
    assert distill_steps == CLIENTS * KD_DISTILL_STEPS, "round 2's clients should all have distilled"
    # All public prompts have prompt_len tokens; a distillation step takes `batch` of them.
    out.update(
        client_distill_tokens=distill_steps * batch * prompt_len,
        reply_inference_tokens=CLIENTS * KD_PUBLIC_PROMPTS * prompt_len,
        server_distill_tokens=KD_SERVER_STEPS * batch * prompt_len,
        public_prompts=KD_PUBLIC_PROMPTS, public_prompt_len=prompt_len, distill_steps=KD_DISTILL_STEPS,
        server_steps=KD_SERVER_STEPS, top_k=KD_TOP_K, peak_gb=peak_gb(device),
    )
    out["distill_tokens_per_s"] = (out["client_distill_tokens"] + out["server_distill_tokens"]) / out["round_s"]
    del model, apps
    free(device)
    return out


def split_round(shape: str, batch: int, seq: int, device: torch.device, graphs: bool = True) -> dict:
    """Split-FedLLM: the clients run blocks [0, c), the main server the rest, one client after another."""
    model = model_for(shape, device)
    body = model.get_base_model().model.config
    s = settings(batch, graphs)
    cut = Cut(model, body.num_hidden_layers // 2)
    wire_dtype = next(model.get_base_model().parameters()).dtype  # the model's dtype: no cast at the cut
    data = client_data(body.vocab_size, batch, seq)
    want = Activations(wire_dtype, body.hidden_size, body.vocab_size)
    main = LocalMainServer(MainServer(model, cut, s, device=device, count_flops=False), want, serialize=False)
    apps = {i: split.SplitClient(i, model, data[i], s, cut=cut, wire_dtype=wire_dtype, device=device,
                                 pad_id=common.PAD, seed=SEED, dial=main.dial) for i in range(CLIENTS)}
    clock = RoundClock(device)
    reset_peak(device)
    split.serve(LocalGrid(apps, serialize=False), cut.part(adapter_state(model), CLIENT), main, FedAvg(),
                want, rounds=2, clients_per_round=CLIENTS, seed=SEED, eval_every=10**9, hooks=clock.hooks)
    out = {**clock.timed_round(seq), "losses": clock.losses(), "cut_layer": cut.layer, "wire_dtype": str(wire_dtype).removeprefix("torch."),
           "peak_gb": peak_gb(device)}
    top, bottom = main.main.top, apps[0].bottom
    out["graphed_shapes"] = None if top is None else {
        "bottom": bottom.captured, "top": top.captured, "failures": [f.failure for f in (bottom, top) if f.failure]}
    del model, apps, main
    free(device)
    return out


def _case(paradigm, shape: str, batch: int, seq: int | None, device: str) -> dict:
    dev = torch.device(device)
    seq = seq or (common.SEQ if shape in ("135m", "1b") else 64)
    random.seed(SEED)
    ours = paradigm(shape, batch, seq, dev)
    fedllm = fedllm_round(shape, batch, seq, dev)
    return {"shape": shape, "batch": batch, "seq": seq, "clients": CLIENTS, "steps": STEPS, "device": str(dev),
            **ours, "fedllm_tokens_per_s": fedllm["tokens_per_s"], "fedllm_round_s": fedllm["round_s"],
            "ratio_to_fedllm": ours["tokens_per_s"] / fedllm["tokens_per_s"]}


def fast_path_check(device: str = "cuda") -> dict:
    """KD's and split's rounds on the ``tiny`` shape with CUDA graphs against the same static steps run eagerly:
    the largest relative difference of any client's or server's loss over both rounds."""
    dev = torch.device(device)
    out = {}
    for name, fn in (("kd", kd_round), ("split", split_round)):
        eager, graphed = (fn("tiny", 4, 64, dev, graphs=g) for g in (False, True))
        pairs = list(zip(eager["losses"], graphed["losses"]))
        assert len(eager["losses"]) == len(graphed["losses"]) > 0
        out[name] = {"losses": len(pairs), "graphed_shapes": graphed["graphed_shapes"],
                     "max_rel_diff": max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)}
    return out


def kd_throughput(shape: str, batch: int, seq: int | None = None, device: str = "cuda") -> dict:
    """KD's round tokens/s and its ratio to FedLLM's (the ``kd_throughput_*`` case of gpu.py)."""
    return _case(kd_round, shape, batch, seq, device)


def split_throughput(shape: str, batch: int, seq: int | None = None, device: str = "cuda") -> dict:
    """Split's round tokens/s and its ratio to FedLLM's (the ``split_throughput_*`` case of gpu.py)."""
    return _case(split_round, shape, batch, seq, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    ap.add_argument("--shape", default="135m", choices=sorted(common.SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; tiny: 64)")
    ap.add_argument("--out", default=None, help="also write the results here as JSON")
    ap.add_argument("--check", action="store_true", help="first compare the graphed rounds with the static eager "
                    "ones on the tiny shape (fast_path_check)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU; use --device cpu --shape tiny for the smoke test.")
    if args.device == "cpu":
        torch.set_num_threads(1)
    results = {}
    if args.check:
        t = time.perf_counter()
        results["fast_path_check"] = fast_path_check(args.device)
        results["fast_path_check"]["bench_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(results["fast_path_check"]), flush=True)
    for name, fn in (("kd", kd_throughput), ("split", split_throughput)):
        t = time.perf_counter()
        results[f"{name}_throughput_{args.shape}"] = r = fn(args.shape, args.batch, args.seq, args.device)
        r["bench_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(r), flush=True)
    for name, r in results.items():
        if name == "fast_path_check":
            continue
        print(f"{name:24s} {r['tokens_per_s']:12.0f} tokens/s   FedLLM {r['fedllm_tokens_per_s']:12.0f}   "
              f"ratio {r['ratio_to_fedllm']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
