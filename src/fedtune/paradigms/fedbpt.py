"""FedBPT: federated black-box prompt tuning with CMA-ES (Sun et al., 2023).

Clients never see weights, gradients or hidden states: they ask an inference-only model service
(`fedtune.model_service`, handed over as ``ctx.services.model_service``: in process, or the gRPC
service ``fedtune model-server``) for the losses of their batches under candidate soft prompts.
The prompt is a low-dimensional vector z (``fedbpt.intrinsic_dim``) projected by a fixed random matrix
A, shared by all through the run seed, to ``p x hidden`` soft-prompt values, added to the embeddings
of the tokens of ``fedbpt.prompt_init`` (so z = 0 is that text) and prepended to every input.

Round r, as the server sees it (`serve`):
  1. sample clients and send each the global search distribution: mean (intrinsic_dim,) and step size sigma;
  2. each client runs CMA-ES (the `cma` package) from it for ``fedbpt.iterations`` generations of
     ``fedbpt.popsize`` candidates, each candidate scored by the service's mean loss on one of the
     client's batches (one Infer request a generation), and replies with its final mean and sigma;
  3. the server aggregates the distributions (`aggregate`: example-weighted means of the means and of
     the sigmas), and every k rounds scores the global prompt (the mean) through the service.

Bytes: the client-server exchange (mean and sigma each way) is the run's ``bytes_up``/``bytes_down``;
the API traffic (every Infer request and reply, exact payload lengths) is in each client record and
in summary.json's ``paradigm_metrics`` (``api_bytes_*``). Client FLOPs are the client's own (the
projection); the service's FLOPs are the server's. Classification tasks only (the score is the
label tokens' logits at the end of the prompt, as `fedtune.evaluate` does). Not checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy
import torch

from ..data.tasks import collate
from ..grid import ClientApp, Grid, exchange
from ..meter import ComputeMeter
from ..registry import Paradigm, register
from ..rounds import RoundLoop, ServerHooks, screen_reply
from ..train.local_steps import batches, round_rng, round_seed
from ..wire import Message, WireError, check, encoded_size


@dataclass
class FedBPTConfig:
    intrinsic_dim: int = 100
    """Dimension of the vector CMA-ES searches (the prompt is a fixed random projection of it)."""
    prompt_init: str = "Answer with the single best label."
    """Text whose token embeddings the soft prompt is added to; its token count is the prompt length."""
    popsize: int = 8
    """CMA-ES candidates per generation (one Infer request scores them all on one batch)."""
    iterations: int = 6
    """CMA-ES generations per client per round."""
    sigma: float = 1.0
    """Initial CMA-ES step size."""
    projection_scale: float = 1.0
    """A's entries have std projection_scale * embedding_std / sqrt(intrinsic_dim) (z ~ N(0, I) -> embedding-sized)."""
    batch_size: int | None = None
    """Examples each candidate is scored on (null: train.batch_size)."""

    def __post_init__(self) -> None:
        for name in ("intrinsic_dim", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"fedbpt.{name} = {getattr(self, name)!r} is not allowed: a positive integer.")
        if self.popsize < 2:
            raise ValueError(f"fedbpt.popsize = {self.popsize!r} is not allowed: at least 2 (CMA-ES ranks candidates).")
        for name in ("sigma", "projection_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"fedbpt.{name} = {getattr(self, name)!r} is not allowed: a positive number.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"fedbpt.batch_size = {self.batch_size!r} is not allowed: a positive integer or null.")
        if not self.prompt_init.strip():
            raise ValueError("fedbpt.prompt_init is empty: give a short text (its tokens start the prompt).")


@dataclass
class Settings:
    dim: int
    popsize: int
    iterations: int
    batch_size: int
    scale: float
    run_seed: int
    count_flops: bool = True


def projection(run_seed: int, dim: int, p: int, hidden: int, std: float) -> torch.Tensor:
    """A: (dim, p * hidden) with N(0, std^2) entries, the same for every party (seeded by the run seed)."""
    g = torch.Generator().manual_seed((run_seed * 7_368_787 + 12_345) % (2**31 - 1))
    return torch.randn(dim, p * hidden, generator=g) * std


def aggregate(updates: list[tuple[torch.Tensor, float, float]]) -> tuple[torch.Tensor, float]:
    """(mean, sigma) of the global search distribution: the example-weighted means of the clients' means and
    sigmas; `updates` holds (mean, sigma, num_examples)."""
    total = sum(n for _, _, n in updates)
    mean = sum(m.double() * (n / total) for m, _, n in updates)
    return mean.float(), float(sum(s * (n / total) for _, s, n in updates))


class Prompter:
    """What a FedBPT party needs to turn z into a soft prompt: the projection, the prompt's token ids."""

    def __init__(self, api, tokenizer_ids: list[int], s: Settings) -> None:
        info = api.info()
        self.hidden = int(info["hidden_size"])
        self.prompt_ids = torch.tensor(tokenizer_ids, dtype=torch.int32)
        std = s.scale * float(info["embedding_std"]) / s.dim ** 0.5
        self.A = projection(s.run_seed, s.dim, len(tokenizer_ids), self.hidden, std)

    def soft(self, z: torch.Tensor) -> torch.Tensor:
        """(n, p, hidden) soft prompts for the rows of z (n, dim)."""
        return (z.float() @ self.A).reshape(len(z), len(self.prompt_ids), self.hidden)


class FedBPTClient(ClientApp):
    """One client: its private examples (token ids) and a `ModelAPI` to the service; no model, no weights."""

    def __init__(self, node_id: int, examples, settings: Settings, *, connect, prompt_ids: list[int],
                 pad_id: int) -> None:
        if not examples:
            raise ValueError(f"client {node_id} has no training examples")
        self.node_id, self.examples, self.settings = node_id, examples, settings
        self.connect, self.prompt_ids, self.pad_id = connect, prompt_ids, pad_id
        self.api = None
        self.prompter: Prompter | None = None

    def __call__(self, msg: Message) -> Message:
        import cma

        if msg.kind != "fedbpt_ins":
            raise ValueError(f"client {self.node_id} cannot handle a {msg.kind!r} message")
        s = self.settings
        check(msg, {"mean": ((s.dim,), torch.float32)})
        if self.api is None:
            self.api = self.connect(self.node_id)
            self.prompter = Prompter(self.api, self.prompt_ids, s)
        before = self.api.traffic()
        rnd = int(msg.meta["round"])
        rng, _ = round_rng(s.run_seed, rnd, self.node_id)
        es = cma.CMAEvolutionStrategy(msg.tensors["mean"].double().numpy(), float(msg.meta["sigma"]), {
            "popsize": s.popsize, "seed": round_seed(s.run_seed, rnd, self.node_id) % (2**31 - 2) + 1,
            "verbose": -9, "maxiter": s.iterations, "tolfun": 0, "tolx": 0})
        own = ComputeMeter("cpu", count_flops=s.count_flops)
        flops, seconds, best = 0, 0.0, []
        for chunk in batches(self.examples, s.batch_size, s.iterations, rng):
            batch = collate(chunk, self.pad_id)
            candidates = es.ask()
            with own:
                prompts = self.prompter.soft(torch.from_numpy(numpy.asarray(candidates)))
            flops, seconds = flops + (own.flops or 0), seconds + own.seconds
            losses = self.api.infer(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                                    soft_prompt=prompts, prompt_ids=self.prompter.prompt_ids)["loss"]
            fitness = losses.double().mean(1).tolist()
            es.tell(candidates, fitness)
            best.append(min(fitness))
        traffic = {k: v - before[k] for k, v in self.api.traffic().items()}
        return Message({"mean": torch.tensor(es.mean, dtype=torch.float32)}, {
            "kind": "fedbpt_res", "round": rnd, "src": self.node_id, "sigma": float(es.sigma),
            "num_examples": len(self.examples), "steps": len(best), "examples_seen": len(best) * s.batch_size,
            "train_loss": sum(best) / len(best), "train_loss_first": best[0], "train_loss_last": best[-1],
            "flops": flops if s.count_flops else None, "peak_memory_bytes": own.peak_memory_bytes,
            "seconds": seconds, **traffic})


# --------------------------------------------------------------------------- server side


def read_update(reply: Message, dim: int) -> tuple[torch.Tensor, float]:
    if reply.kind != "fedbpt_res":
        raise WireError(f"expected a 'fedbpt_res' reply, got {reply.kind!r}")
    check(reply, {"mean": ((dim,), torch.float32)})
    sigma = reply.meta.get("sigma")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < 1e6:
        raise WireError(f"sigma must be a positive finite number, got {sigma!r}")
    return reply.tensors["mean"], float(sigma)


API_FIELDS = ("api_bytes_up", "api_bytes_down", "api_calls", "api_flops")


def serve(grid: Grid, mean: torch.Tensor, sigma: float, *, rounds: int, clients_per_round: int, seed: int,
          eval_every: int, hooks: ServerHooks, min_replies: int = 1, service_flops=lambda: 0
          ) -> tuple[tuple[torch.Tensor, float], list[dict[str, Any]]]:
    """Run the FedBPT round loop; returns the final (mean, sigma) and the evaluations."""
    dim = len(mean)
    loop = RoundLoop(hooks, "FedBPT", nodes=grid.node_ids(), rounds=rounds, clients_per_round=clients_per_round,
                     seed=seed, eval_every=eval_every)
    for rnd, chosen in loop:
        messages = [Message({"mean": mean}, {"kind": "fedbpt_ins", "round": rnd, "dst": n, "sigma": sigma})
                    for n in chosen]
        down = [encoded_size(m) for m in messages]
        updates, api = [], {k: 0 for k in API_FIELDS}
        for node, msg_bytes, reply in zip(chosen, down, exchange(grid, messages,
                                                                  lambda k: hooks.bars.advance("clients", by=k))):
            fields, update = screen_reply(reply, lambda r: read_update(r, dim))
            traffic = {k: reply.meta[k] for k in API_FIELDS if isinstance(reply.meta.get(k), int)}
            hooks.log({"type": "client", "round": rnd, "client": node, "bytes_down": msg_bytes,
                       "bytes_up": encoded_size(reply), **traffic, **fields})
            for k, v in traffic.items():
                api[k] += v
            if update is not None:
                m, s = read_update(reply, dim)
                updates.append((m, s, update[1]))
        hooks.log({"type": "server", "round": rnd, "flops": service_flops()})
        hooks.log({"type": "paradigm", "round": rnd, **api, "sigma": sigma})
        aggregated = len(updates) >= min_replies
        if aggregated:
            mean, sigma = aggregate(updates)
        loop.end(rnd, {"mean": mean}, replies=len(updates), sampled=len(chosen), aggregated=aggregated)
    return (mean, sigma), loop.evaluations


# --------------------------------------------------------------------------- wiring


def settings_of(config) -> Settings:
    b = config.fedbpt
    return Settings(dim=b.intrinsic_dim, popsize=b.popsize, iterations=b.iterations,
                    batch_size=b.batch_size or config.train.batch_size, scale=b.projection_scale,
                    run_seed=config.seed, count_flops=config.train.count_flops)


def prompt_ids_of(ctx) -> list[int]:
    return ctx.tokenizer(ctx.config.fedbpt.prompt_init, add_special_tokens=False)["input_ids"]


def make_clients(ctx) -> dict[int, FedBPTClient]:
    """One client per partition; none touches ``ctx.model``: each connects to the model service as its node."""
    service, s, ids = ctx.services.model_service, settings_of(ctx.config), prompt_ids_of(ctx)
    return {i: FedBPTClient(i, ctx.client_examples(i), s, connect=lambda node: service.connect(f"node-{node}"),
                            prompt_ids=ids, pad_id=ctx.pad_id) for i in range(len(ctx.data.parts))}


def score_prompt(api, prompter: Prompter, z: torch.Tensor, task, examples, batch_size: int, pad_id: int) -> float:
    """Accuracy of the soft prompt of z through the service: the label tokens' logits at the prompt's end."""
    candidates = torch.tensor(task.first_token_ids, dtype=torch.int32)
    soft = prompter.soft(z[None])
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, with_target=False)
        scores = api.infer(batch["input_ids"], batch["attention_mask"], soft_prompt=soft,
                           prompt_ids=prompter.prompt_ids, last=batch["last"], candidates=candidates)["scores"][0]
        correct += int((scores.argmax(-1) == batch["label"]).sum())
    return correct / max(len(examples), 1)


def run_server(ctx, grid: Grid) -> list[dict[str, Any]]:
    """The fed server: aggregates the search distributions, scores the global prompt through the service."""
    from safetensors.torch import save_file

    c, f = ctx.config, ctx.config.federation
    s = settings_of(c)
    service = ctx.services.model_service
    api = service.connect("fed-server")
    prompter = Prompter(api, prompt_ids_of(ctx), s)
    test = ctx.data.test[: c.eval.max_examples]

    def evaluate(state) -> float:
        return score_prompt(api, prompter, state["mean"], ctx.data.task, test, c.eval.batch_size, ctx.pad_id)

    def save(state, rnd: int) -> None:
        save_file({"z": state["mean"].contiguous(), "soft_prompt": prompter.soft(state["mean"][None])[0].contiguous(),
                   "prompt_ids": prompter.prompt_ids}, str(ctx.path / "prompt.safetensors"),
                  metadata={"round": str(rnd), "paradigm": "fedbpt"})

    server = getattr(service, "server", None)
    hooks = ServerHooks(evaluate=evaluate, log=ctx.log, save=save, bars=ctx.bars)
    _, evaluations = serve(grid, torch.zeros(s.dim), c.fedbpt.sigma, rounds=f.rounds,
                           clients_per_round=f.clients_per_round, seed=c.seed, eval_every=c.eval.every, hooks=hooks,
                           min_replies=f.min_replies,
                           service_flops=(server.take_flops if server is not None else lambda: 0))
    ctx.log({"type": "paradigm", "api_bytes_fed_server": api.bytes_up + api.bytes_down})
    return evaluations


def _validate(config) -> None:
    if config.data.task != "classification":
        raise ValueError("federation.paradigm = 'fedbpt' scores classification tasks only (data.task = "
                         f"{config.data.task!r}): the service scores label tokens, it does not generate.")


register(Paradigm(
    "fedbpt", "FedBPT", "black-box prompt tuning: CMA-ES on a projected soft prompt, losses from an inference-only "
    "model service; the server averages the search distributions", make_clients, run_server, access="black",
    backprop=False, section=("fedbpt", FedBPTConfig), validate=_validate, checkpoints=lambda config: False,
    strategy_label="fedavg (CMA-ES mean, sigma)",
))
