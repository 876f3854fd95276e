"""Offsite-tuning's emulator distillation on the real SmolLM2-135M-Instruct (CPU): what it costs and what it buys.

Builds the demo config's emulator (2 + 2 adapter blocks, 6 of the 26 middle blocks), samples the public
distillation text from the prompt template's fixed start, distils for ``--steps`` steps and reports the
hidden-state MSE on held-out samples and the emulator's loss on the task's answer token (zero adapter) on
``--val`` training rows (a validation slice: never the test set) before and after, against the full model's.

    python benchmarks/offsite_distill.py --steps 100 --out benchmarks/offsite_distill_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401  (puts src/ on the path)
import torch

from fedtune import config as cfg
from fedtune.data.tasks import collate
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora, load_base
from fedtune.paradigms import offsite as off
from fedtune.paradigms import offsite_distill as od
from fedtune.progress import Bars


def task_loss(model, examples, pad_id: int) -> float:
    with torch.no_grad():
        b = collate(examples, pad_id)
        return float(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    c = cfg.load("examples/demo.yaml", [])
    base, tok = load_base(c.model.name, device=torch.device("cpu"))
    model = attach_lora(base, c.peft, c.seed)
    data = prepare_data(c, tok, Bars(quiet=True))
    val = data.train[-a.val:]  # training rows: a validation slice, not the test set
    o = c.offsite
    L = base.config.num_hidden_layers
    plan = off.layer_plan(L, o.bottom, o.top, o.middle)
    config, weights = off.build_emulator(model, plan)
    cj = config.to_json_string(use_diff=False)
    student = off.plain_emulator(cj, weights, torch.device("cpu"))
    with model.disable_adapter():
        full_loss = task_loss(model, val, tok.pad_token_id)
    before_loss = task_loss(student, val, tok.pad_token_id)
    t0 = time.perf_counter()
    held = max(1, a.samples // 4)
    ids = od.distill_text(model, tok, od.prompt_prefix(c.data.prompt), a.samples + held, a.length, c.seed + 3,
                          torch.device("cpu"), batch_size=16)
    gen_seconds = time.perf_counter() - t0
    middle = list(range(o.bottom, len(plan) - o.top))
    got = od.distil_middle(model, student, middle=middle, teacher_index=L - o.top, student_index=len(plan) - o.top,
                           train_ids=ids[: a.samples], held_ids=ids[a.samples:], steps=a.steps, lr=a.lr,
                           batch_size=a.batch, seed=c.seed, device=torch.device("cpu"))
    after_loss = task_loss(student, val, tok.pad_token_id)
    losses = got.pop("losses")
    out = {"device": "cpu (shared, busy: times are noisy)", "threads": torch.get_num_threads(), "plan": plan,
           "steps": a.steps, "lr": a.lr, "samples": a.samples, "length": a.length, "batch": a.batch,
           "text_seconds": gen_seconds, **got, "loss_curve_every_10": losses[::10] + losses[-1:],
           "val_task_loss": {"full_model": full_loss, "emulator_undistilled": before_loss,
                             "emulator_distilled": after_loss},
           "sample_text": tok.decode(ids[0])}
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
