"""GPU performance of fedtune's simulation against plain transformers + peft (issue 5).

Run on a CUDA machine: ``python benchmarks/gpu.py --out benchmarks/results.json`` (``make bench``).
Every case uses random weights (speed does not depend on them) of two Llama shapes:
``135m`` (SmolLM2-135M: hidden 576, 30 layers, 9/3 heads, vocab 49152) and ``1b``
(Llama-3.2-1B-like: hidden 2048, 16 layers, 32/8 heads, vocab 128256), LoRA r=16 on
every linear layer, AdamW, sequences of 512 tokens, full-sequence language-modelling
labels. Cases, each printed as a ratio against its baseline run in the same process:

* ``client_step``: one client's training step. Baseline ("plain"): what the
  anchor frameworks' clients run: fp32 base, bf16 autocast, fp32 adapters,
  ``model(input_ids, attention_mask, labels).loss``, AdamW. Ours: fedtune's
  `StepRunner` (bf16 base, fp32 adapters, CUDA graphs). Same initial weights and
  batches; the losses of both are printed side by side. MFU = FLOPs counted by
  ``FlopCounterMode`` on a real step / time / peak bf16 matmul throughput
  (measured here, and the issue's 785 TFLOP/s).
* ``throughput``: a FedLLM round of 10 clients x 10 local steps through the real
  round loop (`fedpeft.serve`, `LocalGrid`), against centralized LoRA training of
  the same total tokens (one client, 100 steps, same runner): tokens/s ratio.
* ``many_clients``: 1,000 clients, 100 per round: peak GPU memory of a round
  against centralized training of the same model and batch.
* ``anchor_style``: the round as the anchor frameworks run it (a fresh
  ``from_pretrained`` of the base from a local safetensors folder and adapter
  injection for every client, plain step) against ours, on the 1B model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from _common import LORA, LR, PAD, SEQ, SHAPES, as_examples, build, free, random_batches  # puts src/ on the path
import paradigm_throughput  # the KD and split cases
from peft import get_peft_model, set_peft_model_state_dict

from fedtune.paradigms import fedpeft
from fedtune.progress import Bars
from fedtune.runtime.local import LocalGrid
from fedtune.strategies import FedAvg
from fedtune.rounds import ServerHooks
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings
from fedtune.train.step_runner import make_runner

ISSUE_PEAK = 785e12


def log(*args) -> None:
    print(*args, flush=True)


def settings(batch: int, steps: int, compile: bool = False) -> TrainSettings:
    return TrainSettings(local_steps=steps, local_epochs=None, batch_size=batch, lr=LR, count_flops=False,
                                 compile=compile)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def peak_matmul_flops() -> float:
    """Measured bf16 dense matmul throughput (8192^3, best of 20)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b) for _ in range(20))
    return 2 * 8192**3 / best


# --------------------------------------------------------------------------- plain transformers + peft


def plain_steps(model, batches: list[torch.Tensor], record: list[float] | None = None) -> None:
    """The anchor frameworks' step: autocast bf16 over an fp32 (or bf16) base, HF's own loss, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    model.train()
    for ids in batches:
        ids = ids.cuda(non_blocking=True)
        labels = ids.clone()
        labels[:, 0] = -100
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if record is not None:
            record.append(loss.detach())


# --------------------------------------------------------------------------- cases


def client_step(shape: str, batch: int, steps: int, peak: float, compile: bool = False) -> dict:
    """Tokens/s of one client's steps: plain vs ours, on the same initial weights and batches."""
    batches = random_batches(steps + 3, batch, SHAPES[shape]["vocab_size"], seed=1)
    out: dict = {"shape": shape, "batch": batch, "seq": SEQ, "steps": steps, "compile": compile}

    plain = build(shape, torch.float32)
    plain_losses: list = []
    plain_steps(plain, batches[:3])  # warm-up (cuBLAS, allocator)
    plain_fresh = build(shape, torch.float32)
    del plain
    free()
    torch.cuda.reset_peak_memory_stats()
    t = timed(lambda: plain_steps(plain_fresh, batches[3:], plain_losses))
    out["plain_tokens_per_s"] = batch * SEQ * steps / t
    out["plain_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["plain_losses"] = [round(float(x), 4) for x in plain_losses[:3]]
    del plain_fresh
    free()

    ours = build(shape, torch.bfloat16)
    runner = make_runner(ours, settings(batch, steps, compile), device=torch.device("cuda"), pad_id=PAD)
    runner.count_flops = True
    runner.reset()
    examples = [as_examples(b) for b in batches[3:]]
    runner.step(examples[0])  # captures the graph (warm-up and capture leave the state as it was)
    torch.cuda.synchronize()
    # Start again from the initial adapter so the losses compare step by step with plain's.
    ours_fresh = build(shape, torch.bfloat16)
    for p_new, p_old in zip([p for p in ours_fresh.parameters() if p.requires_grad], runner.params):
        p_old.data.copy_(p_new.data)
    del ours_fresh
    runner.reset()
    free()
    torch.cuda.reset_peak_memory_stats()

    def run_ours():
        for ex in examples:
            runner.step(ex)

    t = timed(run_ours)
    ours_losses = runner.losses()
    out["ours_tokens_per_s"] = batch * SEQ * steps / t
    out["ours_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["ours_losses"] = [round(x, 4) for x in ours_losses[:3]]
    out["cuda_graphs"] = runner.captured_shapes > 0
    out["graph_failure"] = runner.graph_failure
    flops_per_step = runner.flops / steps
    out["flops_per_step"] = flops_per_step
    out["mfu_measured_peak"] = flops_per_step * steps / t / peak
    out["mfu"] = flops_per_step * steps / t / ISSUE_PEAK
    out["speedup"] = out["ours_tokens_per_s"] / out["plain_tokens_per_s"]
    out["loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours_losses, [float(x) for x in plain_losses]))
    del ours, runner
    free()
    return out


def simulate(model, runner, clients: int, per_round: int, steps: int, batch: int, rounds: int, seed: int):
    """`rounds` FedLLM rounds through the real round loop; returns (seconds, tokens, peak GB)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    s = settings(batch, steps)
    # Each client holds just enough distinct sequences for its steps (generated once, on the CPU).
    data = random_batches(clients, batch * 2, vocab, seed=seed)
    apps = {i: fedpeft.FedPeftClient(i, model, as_examples(data[i]), s, device=torch.device("cuda"), pad_id=PAD,
                                     seed=seed, runner=runner) for i in range(clients)}
    grid = LocalGrid(apps, serialize=False)
    hooks = ServerHooks(evaluate=lambda st: 0.0, log=lambda r: None, save=lambda st, r: None,
                                bars=Bars(quiet=True))
    init = adapter_state(model)
    torch.cuda.reset_peak_memory_stats()
    t = timed(lambda: fedpeft.serve(grid, init, FedAvg(), rounds=rounds, clients_per_round=per_round, seed=seed,
                                    eval_every=10**9, hooks=hooks))
    return t, rounds * per_round * steps * batch * SEQ, torch.cuda.max_memory_allocated() / 1e9


def throughput(shape: str, batch: int) -> dict:
    """FedLLM 10 clients x 10 steps vs centralized 100 steps: same runner, tokens and shapes."""
    model = build(shape, torch.bfloat16)
    runner = make_runner(model, settings(batch, 10), device=torch.device("cuda"), pad_id=PAD)
    simulate(model, runner, 2, 2, 2, batch, 1, seed=5)  # capture the graph once, outside the timings
    fed_t, fed_tokens, fed_peak = simulate(model, runner, 10, 10, 10, batch, 1, seed=6)
    cen_t, cen_tokens, cen_peak = simulate(model, runner, 1, 1, 100, batch, 1, seed=7)
    del model, runner
    free()
    return {"shape": shape, "batch": batch, "federated_tokens_per_s": fed_tokens / fed_t,
            "centralized_tokens_per_s": cen_tokens / cen_t, "ratio": (fed_tokens / fed_t) / (cen_tokens / cen_t),
            "federated_round_s": fed_t, "centralized_s": cen_t, "federated_peak_gb": fed_peak,
            "centralized_peak_gb": cen_peak}


def many_clients(shape: str, batch: int, steps: int) -> dict:
    """1,000 clients, 100 a round, 2 rounds: peak GPU memory against centralized training.

    Both peaks are counted from what was allocated before this case built its model (leftovers of
    earlier cases would otherwise be added to both and pull the ratio towards 1).
    """
    free()
    before = torch.cuda.memory_allocated() / 1e9
    model = build(shape, torch.bfloat16)
    runner = make_runner(model, settings(batch, steps), device=torch.device("cuda"), pad_id=PAD)
    # Capture the graph first: its warm-up steps run eagerly and would inflate whichever run came first.
    simulate(model, runner, 2, 2, 2, batch, 1, seed=5)
    free()
    cen_t, _, cen_peak = simulate(model, runner, 1, 1, steps * 5, batch, 1, seed=8)
    free()
    fed_t, tokens, fed_peak = simulate(model, runner, 1000, 100, steps, batch, 2, seed=9)
    del model, runner
    free()
    fed_peak, cen_peak = fed_peak - before, cen_peak - before
    return {"shape": shape, "clients": 1000, "per_round": 100, "rounds": 2, "federated_peak_gb": fed_peak,
            "centralized_peak_gb": cen_peak, "allocated_before_gb": before, "memory_ratio": fed_peak / cen_peak,
            "federated_s": fed_t,
            "federated_tokens_per_s": tokens / fed_t}


def anchor_style(shape: str, batch: int, clients: int, steps: int) -> dict:
    """One round the anchor frameworks' way vs ours (10 clients x 10 steps)."""
    folder = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    build(shape, torch.bfloat16, lora=False).save_pretrained(folder, safe_serialization=True)
    free()
    vocab = SHAPES[shape]["vocab_size"]
    data = random_batches(clients * steps, batch, vocab, seed=10)
    from transformers import AutoModelForCausalLM
    from peft import get_peft_model_state_dict

    global_state = None

    def their_round():
        nonlocal global_state
        states = []
        for c in range(clients):
            base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
            model = get_peft_model(base, LORA)
            if global_state is not None:
                set_peft_model_state_dict(model, global_state)
            plain_steps(model, data[c * steps:(c + 1) * steps])
            states.append({k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()})
            del model, base
        global_state = {k: sum(s[k] for s in states) / len(states) for k in states[0]}

    their_t = timed(their_round)
    free()
    model = build(shape, torch.bfloat16)
    runner = make_runner(model, settings(batch, steps), device=torch.device("cuda"), pad_id=PAD)
    # Ours includes capturing the graph: a cold first round, as theirs is.
    our_t, _, _ = simulate(model, runner, clients, clients, steps, batch, 1, seed=11)
    warm_t, _, _ = simulate(model, runner, clients, clients, steps, batch, 1, seed=12)
    del model, runner
    free()
    return {"shape": shape, "clients": clients, "steps": steps, "batch": batch, "anchor_round_s": their_t,
            "ours_first_round_s": our_t, "ours_round_s": warm_t, "ratio": their_t / warm_t,
            "ratio_first_round": their_t / our_t}


# --------------------------------------------------------------------------- main


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "device": torch.cuda.get_device_name(0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results.json")
    ap.add_argument("--cases", default="client_step,throughput,many_clients,anchor_style,kd_throughput,"
                                       "split_throughput")
    ap.add_argument("--quick", action="store_true", help="fewer steps: a smoke run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (the CPU test suite covers correctness).")
    torch.backends.cuda.matmul.allow_tf32 = True
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cases = args.cases.split(",")
    steps = 5 if args.quick else 20
    results: dict = {"versions": versions(), "command": " ".join(sys.argv), "cases": {}}
    peak = peak_matmul_flops()
    results["measured_peak_bf16_tflops"] = peak / 1e12
    log(f"{results['versions']}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    plan = {
        "client_step_135m_b4": lambda: client_step("135m", 4, steps, peak),
        "client_step_1b_b16": lambda: client_step("1b", 16, max(5, steps // 2), peak),
        "client_step_compiled_1b_b16": lambda: client_step("1b", 16, max(5, steps // 2), peak, compile=True),
        "client_step_compiled_135m_b4": lambda: client_step("135m", 4, steps, peak, compile=True),
        "throughput_135m": lambda: throughput("135m", 4),
        "throughput_1b": lambda: throughput("1b", 4),
        "many_clients_135m": lambda: many_clients("135m", 4, 2),
        "anchor_style_1b": lambda: anchor_style("1b", 4, 10, 10),
        # KD and split beside FedLLM (benchmarks/paradigm_throughput.py)
        "kd_throughput_135m": lambda: paradigm_throughput.kd_throughput("135m", 4),
        "split_throughput_135m": lambda: paradigm_throughput.split_throughput("135m", 4),
    }
    for name, fn in plan.items():
        if not any(name.startswith(c) for c in cases):
            continue
        log(f"--- {name}")
        t = time.perf_counter()
        try:
            results["cases"][name] = fn()
        except Exception as err:  # one failing case must not lose the others
            results["cases"][name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        results["cases"][name]["bench_s"] = round(time.perf_counter() - t, 1)
        log(json.dumps(results["cases"][name], default=str))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))  # a killed run keeps its cases
        free()
    c = results["cases"]

    def get(case: str, key: str):
        return c.get(case, {}).get(key)

    results["summary"] = {
        "device": results["versions"]["device"],
        "client_step_speedup_135m": get("client_step_compiled_135m_b4", "speedup"),
        "mfu_1b": get("client_step_compiled_1b_b16", "mfu"),
        "throughput_ratio_135m": get("throughput_135m", "ratio"),
        "throughput_ratio_1b": get("throughput_1b", "ratio"),
        "many_clients_memory_ratio": get("many_clients_135m", "memory_ratio"),
        "anchor_style_ratio": get("anchor_style_1b", "ratio"),
        "kd_tokens_per_s_135m": get("kd_throughput_135m", "tokens_per_s"),
        "kd_to_fedllm_ratio_135m": get("kd_throughput_135m", "ratio_to_fedllm"),
        "split_tokens_per_s_135m": get("split_throughput_135m", "tokens_per_s"),
        "split_to_fedllm_ratio_135m": get("split_throughput_135m", "ratio_to_fedllm"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    log("\nfigure                      value   target")
    targets = {"client_step_speedup_135m": ">= 5", "mfu_1b": ">= 0.40", "throughput_ratio_135m": ">= 0.95",
               "throughput_ratio_1b": ">= 0.95", "many_clients_memory_ratio": "<= 1.1", "anchor_style_ratio": ">= 3"}
    for k, v in results["summary"].items():
        if k != "device":
            log(f"{k:27s} {v if v is None else round(v, 3)!s:>7}   {targets.get(k, 'reported')}")


if __name__ == "__main__":
    main()
