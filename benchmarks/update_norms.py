"""The L2 norms of the clients' first-round updates under a config: what to set ``privacy.clip`` near.

    python benchmarks/update_norms.py examples/sst2-dirichlet.yaml --set train.lr=0.003

Not private (it prints every client's norm): a tool for choosing the clip on data you may look at, as
docs/privacy.md describes.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from fedtune import config as cfg
from fedtune import experiment
from fedtune.paradigms import fedpeft
from fedtune.progress import Bars
from fedtune.train.adapter import adapter_state
from fedtune.wire import Message


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    c = cfg.load(args.config, args.overrides)
    bars = Bars(quiet=True)
    model, tokenizer, data, device = experiment.setup(c, bars)
    try:
        ctx = experiment.context(c, model, tokenizer, data, device, bars, log=lambda r: None, score=lambda: 0.0,
                                 path=experiment.Path("/tmp"))
        start = adapter_state(model)
        norms = []
        for node, app in fedpeft.make_clients(ctx).items():
            reply = app(Message(start, {"kind": "fit_ins", "round": 1, "dst": node}))
            norms.append(float(torch.cat([(reply.tensors[k].float() - start[k].float()).reshape(-1)
                                          for k in start]).norm()))
        print(json.dumps({"norms": norms, "median": statistics.median(norms)}))
    finally:
        model.unload()


if __name__ == "__main__":
    main()
