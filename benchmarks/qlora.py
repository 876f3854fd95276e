"""QLoRA on a GPU: memory of the frozen base and training throughput, NF4 and int8 against bf16.

For each Llama shape (``135m``: SmolLM2-135M's; ``1b``: Llama-3.2-1B-like; random weights, as speed and
memory do not depend on them) and each base (``bf16``, ``nf4``, ``int8``, `fedtune.quantize`):

* ``base_gb``: GPU memory held by the frozen base alone (``torch.cuda.memory_allocated`` after loading it);
* ``peak_gb``: peak GPU memory over the timed LoRA training steps (r=16 on every linear layer, fp32 adapters);
* ``tokens_per_s``: training tokens a second over the timed steps (batch × 512 tokens, fedtune's step
  runner as a client runs it: bf16 autocast, CUDA graphs when capture succeeds);
* ``base_ratio``: ``base_gb`` over the bf16 base's of the same shape (target: NF4 <= 0.35 on ``1b``).

    python benchmarks/qlora.py --out benchmarks/qlora_h100.json          # needs CUDA and bitsandbytes
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import LORA, PAD, SEQ, SHAPES, as_examples, free, random_batches
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.quantize import base_bytes, quantize_linears
from fedtune.train.local_steps import TrainSettings
from fedtune.train.step_runner import make_runner


def build_base(shape: str, quantization: str, seed: int = 0) -> LlamaForCausalLM:
    """A random-weight, frozen Llama of `shape` on the GPU: bf16, or quantized from those bf16 weights (built on
    the GPU, which is faster than on the host; the float copies are freed once quantized)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    if quantization != "none":
        quantize_linears(model, quantization, torch.bfloat16, torch.device("cuda"))
    return model.to("cuda")


def case(shape: str, quantization: str, batch: int, steps: int, graphs: bool) -> dict:
    free()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    base = build_base(shape, quantization)
    free()  # the float weights that quantization replaced
    load_s = time.perf_counter() - t0
    out = {"shape": shape, "quantization": quantization, "batch": batch, "seq": SEQ,
           "base_gb": (torch.cuda.memory_allocated() - before) / 1e9, "base_weight_gb": base_bytes(base) / 1e9,
           "load_s": load_s}
    torch.manual_seed(1)
    model = get_peft_model(base, LORA)
    settings = TrainSettings(local_steps=steps, local_epochs=None, batch_size=batch, lr=1e-4, count_flops=False,
                             cuda_graphs=graphs)
    runner = make_runner(model, settings, device=torch.device("cuda"), pad_id=PAD)
    examples = [as_examples(b) for b in random_batches(steps + 2, batch, SHAPES[shape]["vocab_size"], 0)]
    runner.reset()
    for ex in examples[:2]:  # warm-up (and graph capture)
        runner.step(ex)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for ex in examples[2:]:
        runner.step(ex)
    losses = runner.losses()  # synchronises
    seconds = time.perf_counter() - t
    out.update(tokens_per_s=batch * SEQ * steps / seconds, peak_gb=torch.cuda.max_memory_allocated() / 1e9,
               loss_first=losses[2] if len(losses) > 2 else None, loss_last=losses[-1],
               cuda_graphs=runner.graphs and runner.captured_shapes > 0, graph_failure=runner.graph_failure)
    del runner, model, base
    free()
    return out


def check_roundtrip(kind: str) -> dict:
    """fedtune's own path on a quantized base: attach LoRA, train 3 steps, save in PEFT format, reload onto a
    fresh quantized base with `PeftModel.from_pretrained`, compare the logits (tiny shape)."""
    import tempfile
    from types import SimpleNamespace

    from peft import PeftModel

    from fedtune.models import attach_lora
    from fedtune.train.adapter import adapter_state

    p = SimpleNamespace(method="lora", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = attach_lora(build_base("tiny", kind), p, seed=0)
    settings = TrainSettings(local_steps=3, local_epochs=None, batch_size=4, lr=1e-2, count_flops=False)
    runner = make_runner(model, settings, device=torch.device("cuda"), pad_id=PAD)
    runner.reset()
    for ex in [as_examples(b) for b in random_batches(3, 4, SHAPES["tiny"]["vocab_size"], 1)]:
        runner.step(ex)
    state = adapter_state(model)
    ids = random_batches(1, 2, SHAPES["tiny"]["vocab_size"], 2)[0][:, :32].cuda()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        again = PeftModel.from_pretrained(build_base("tiny", kind), d).eval()
        with torch.no_grad():
            got = again(input_ids=ids).logits.float()
    moved = max(float((v - 0).abs().max()) for k, v in state.items() if "lora_B" in k)
    return {"check": "roundtrip", "quantization": kind, "losses": runner.losses(), "lora_B_max": moved,
            "max_logit_diff": float((got - ref).abs().max()), "logit_scale": float(ref.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="135m,1b")
    ap.add_argument("--kinds", default="none,nf4,int8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-graphs", action="store_true", help="eager steps (no CUDA graphs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--check", action="store_true", help="also the save / reload round trip on the tiny shape")
    args = ap.parse_args()
    results = []
    if args.check:
        for kind in ("nf4", "int8"):
            try:
                r = check_roundtrip(kind)
            except Exception as err:
                r = {"check": "roundtrip", "quantization": kind, "error": f"{type(err).__name__}: {err}"[:800]}
            print(json.dumps(r), flush=True)
            results.append(r)
    for shape in args.shapes.split(","):
        bf16 = None
        for kind in args.kinds.split(","):
            try:
                r = case(shape, kind, args.batch, args.steps, not args.no_graphs)
            except Exception as err:  # report and go on: one failing case must not lose the others
                r = {"shape": shape, "quantization": kind, "error": f"{type(err).__name__}: {err}"[:500]}
                free()
            if kind == "none" and "base_gb" in r:
                bf16 = r
            if bf16 is not None and "base_gb" in r:
                r["base_ratio"] = r["base_gb"] / bf16["base_gb"]
                r["tokens_per_s_ratio"] = r["tokens_per_s"] / bf16["tokens_per_s"]
            print(json.dumps(r), flush=True)
            results.append(r)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
