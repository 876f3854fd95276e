"""Golden results: every paradigm's numbers at a fixed seed on tiny-llama, pinned before any refactor.

Each case runs the real experiment (`experiment.run`, as `fedtune run` does) and is compared with
``tests/golden.json``: per-round accuracy, every client record's training losses, the bytes each way,
and a fingerprint of the final adapter (its norm and two fixed random projections). A refactor that
keeps the math keeps these numbers; floats are compared to a relative 1e-4 (the same machine gives
identical numbers; another CPU may round a few reductions differently), bytes to 16 bytes a message (a
message's JSON header carries floats such as the training loss, whose printed length can differ by a digit
when their last bit does, and the header is padded to 8 bytes).

``python tests/test_golden.py --update`` rewrites the file: only for a change that is meant to move
the numbers, said so in its commit message.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).with_name("golden.json")

BASE = ["model.name=tiny-llama", "data.demo_train_size=96", "data.demo_test_size=24", "data.partition=dirichlet",
        "data.alpha=1.0", "federation.num_clients=3", "federation.clients_per_round=2", "federation.rounds=2",
        "train.local_steps=3", "train.batch_size=4", "train.lr=0.003", "eval.max_examples=24", "eval.base=true",
        "kd.public_size=8", "kd.distill_steps=1", "kd.server_steps=2", "split.cut_layer=1"]

CASES = {
    "fedpeft": ["federation.paradigm=fedpeft"],
    "fedpeft_fedadam": ["federation.paradigm=fedpeft", "federation.strategy=fedadam"],
    "fedprox": ["federation.paradigm=fedprox", "federation.prox_mu=0.1"],
    "centralized": ["federation.paradigm=centralized"],
    "kd": ["federation.paradigm=kd"],
    "split": ["federation.paradigm=split"],
    "split_u_shaped": ["federation.paradigm=split", "split.u_shaped=true"],
    "batched_clients": ["federation.paradigm=fedpeft", "runtime.batch_clients=2"],
}

REL = 1e-4


def fingerprint(adapter_file: Path) -> dict[str, float]:
    """Norm and two fixed random projections of the saved adapter (keys sorted; seeded directions)."""
    state = load_file(str(adapter_file))
    flat = torch.cat([state[k].double().reshape(-1) for k in sorted(state)])
    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(2, flat.numel(), generator=g, dtype=torch.float64)
    return {"norm": float(flat.norm()), "proj0": float(dirs[0] @ flat), "proj1": float(dirs[1] @ flat),
            "numel": int(flat.numel())}


def observe(name: str, out: Path) -> dict:
    """Run case `name` into `out` and return what the golden file pins."""
    import torch

    from fedtune import config as cfg
    from fedtune import experiment

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order wherever it runs
    try:
        c = cfg.load(None, BASE + CASES[name] + [f"name=golden-{name}"])
        summary = experiment.run(c, out, quiet=True)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    return {
        "accuracy": [r["accuracy"] for r in records if r["type"] == "eval"],
        "losses": [[r["round"], r["client"], r.get("train_loss"), r.get("train_loss_last")] for r in clients],
        "bytes": [[r["bytes_up"], r["bytes_down"]] for r in clients],
        "status": [r["status"] for r in clients],
        "final_accuracy": summary["accuracy"],
        "adapter": fingerprint(out / "adapter" / "adapter_model.safetensors"),
    }


BYTES_SLACK = 16


def close_bytes(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= BYTES_SLACK for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=REL, abs_tol=1e-6)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", sorted(CASES))
def test_paradigm_matches_golden(name, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = observe(name, tmp_path / name)
    want = golden[name]
    for key in want:
        same = close_bytes(got[key], want[key]) if key == "bytes" else close(got[key], want[key])
        assert same, f"{name}: {key} changed:\n got  {got[key]}\n want {want[key]}"


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_golden.py --update   (rewrites tests/golden.json)")
    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps({n: observe(n, Path(tmp) / n) for n in sorted(CASES)}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
