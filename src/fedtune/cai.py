"""Constitutional AI on the server (``safety.cai``): a short step on the global adapter after every aggregation.

As in "Toward Responsible Federated LLMs" (arXiv 2502.16691), the step touches no client data: the server
holds red-team prompts (the ``redteam`` split of `fedtune.safety.hh_splits`), and after each round

1. the global model answers ``safety.cai_prompts`` of them (greedy, in turn over the split);
2. for each, a principle of the `CONSTITUTION` is drawn (seeded by round and prompt) and a reviser writes a
   critique (the principle's critique request) and a revision (its revision request), as the open CAI
   pipelines do (Bai et al. 2022, "Constitutional AI", appendix C: the requests below are theirs);
3. the global adapter trains ``safety.cai_steps`` steps on the revisions (SFT), or with ``safety.cai_dpo`` on
   DPO pairs (revision preferred over the first answer; the aggregated adapter is the reference).

A 135M model critiques itself poorly, so ``safety.cai_reviser`` names the reviser: ``templates`` (no model:
the critique names the principle and the revision is a refusal template) or any Hugging Face causal LM id /
local path (it critiques and revises through its chat template). Each round's cost (seconds, FLOPs of
generation and training) is logged as a ``server`` record beside the round's client costs, with the reviser
that produced it; the prompts, answers, critiques and revisions go to ``<run>/safety/cai-round-<r>.jsonl``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import torch

from .data.tasks import Example, collate
from .dpo import dpo_loss, pair_logps
from .meter import ComputeMeter
from .safety import hh_splits
from .safety_eval import chat_ids, greedy_answers
from .train.adapter import State, adapter_state, load_adapter_state
from .train.losses import lm_loss


@dataclass(frozen=True)
class Principle:
    """One principle of the constitution: how to critique an answer, and how to revise it."""

    name: str
    critique: str
    revision: str


CONSTITUTION: tuple[Principle, ...] = (
    Principle("harmful",
              "Identify specific ways in which the assistant's last response is harmful, unethical, racist, sexist, "
              "toxic, dangerous, or illegal.",
              "Please rewrite the assistant response to remove any and all harmful, unethical, racist, sexist, "
              "toxic, dangerous, or illegal content."),
    Principle("dangerous",
              "Explain ways in which the assistant's preceding response may be harmful to either the human or others. "
              "For example, if the assistant says anything that encourages dangerous or illegal activity, make sure "
              "to point it out.",
              "Please rewrite the assistant response to remove any and all harmful content, including anything "
              "dangerous, illegal, racist, sexist or socially biased."),
    Principle("illegal",
              "Discuss whether the assistant provided any advice that may encourage illegal or dangerous activity "
              "from either the human or others.",
              "Revise the assistant's response so as to refrain from giving legally questionable or dangerous advice."),
    Principle("ethical",
              "Discuss whether the human is deliberately trying to bait the assistant into generating harmful "
              "content, and whether they succeeded in doing so.",
              "Write a revision of the assistant's response that refrains from saying anything harmful."),
    Principle("insensitive",
              "Identify all ways in which the assistant's last response is harmful, unethical, or socially biased. "
              "Furthermore, provide specific details on how the assistant can improve its response.",
              "Please rewrite the assistant response to remove all harmful, unethical, or socially biased content, "
              "and move the conversation in a positive direction."),
    Principle("wise",
              "What's the strongest argument you could give that the assistant's last response was in some way "
              "harmful, unethical, racist, sexist, toxic, dangerous, or illegal.",
              "Amend the assistant's last response to remove any and all harmful, unethical, racist, toxic, "
              "dangerous, and illegal content."),
)
"""The constitution: six critique / revision request pairs from the CAI paper's appendix C."""

REFUSAL_TEMPLATES: dict[str, str] = {
    "harmful": "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "dangerous": "I'm sorry, but I can't help with that, because it could put you or others in danger.",
    "illegal": "I cannot help with this request: it would mean assisting with something illegal.",
    "ethical": "I'm sorry, but I won't help with that. If you have another question, I'm happy to help.",
    "insensitive": "I'm sorry, but I can't assist with that. Let's talk about something more constructive.",
    "wise": "I apologize, but I cannot provide that. It could be used to hurt someone.",
}
"""The template reviser's revision for each principle (each says no, and why)."""


def principle_for(seed: int, rnd: int, k: int) -> Principle:
    """The principle applied to the k-th prompt of round `rnd` (seeded: the same run draws the same ones)."""
    return CONSTITUTION[random.Random(f"{seed}:{rnd}:{k}").randrange(len(CONSTITUTION))]


class TemplateReviser:
    """The fallback reviser: a critique that names the principle, a refusal template as the revision."""

    name = "templates"

    def revise(self, prompt: str, answer: str, principle: Principle) -> tuple[str, str]:
        critique = (f"Under the principle '{principle.name}' ({principle.critique}) the answer goes along with a "
                    "request that should be declined.")
        return critique, REFUSAL_TEMPLATES[principle.name]


class ModelReviser:
    """Another model critiques and revises, through its chat template (any HF causal LM id or path)."""

    def __init__(self, name: str, device: torch.device, max_new_tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
        except (OSError, ValueError) as err:
            raise ValueError(f"safety.cai_reviser = {name!r} is neither `templates` nor a loadable Hugging Face causal "
                             f"LM id or local path ({type(err).__name__}: {str(err)[:200]}).") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name, self.device, self.max_new_tokens = name, device, max_new_tokens

    def _say(self, chat: list[dict[str, str]]) -> str:
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return greedy_answers(self.model, self.tokenizer, [ids], max_new_tokens=self.max_new_tokens, batch_size=1,
                              device=self.device)[0]

    def revise(self, prompt: str, answer: str, principle: Principle) -> tuple[str, str]:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer},
                {"role": "user", "content": principle.critique}]
        critique = self._say(chat)
        chat += [{"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]
        return critique, self._say(chat)


def make_reviser(name: str, device: torch.device, max_new_tokens: int):
    """`TemplateReviser` for ``templates``, else a `ModelReviser` loading `name`."""
    return TemplateReviser() if name == "templates" else ModelReviser(name, device, max_new_tokens)


def sft_steps(model, examples: list[Example], *, steps: int, lr: float, batch_size: int, pad_id: int, seed: int,
              device: torch.device) -> list[float]:
    """`steps` AdamW steps of the model's trainable (adapter) parameters on `examples`; the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        chunk = rng.sample(examples, min(batch_size, len(examples)))
        loss, _ = lm_loss(model, {k: v.to(device) for k, v in collate(chunk, pad_id).items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def dpo_steps(model, chosen: list[Example], rejected: list[Example], *, steps: int, lr: float, beta: float,
              batch_size: int, pad_id: int, seed: int, device: torch.device) -> list[float]:
    """`steps` DPO steps on the pairs, the model as it is now being the frozen reference; the losses."""
    with torch.no_grad():
        ref = [pair_logps(model, [c], [r], pad_id, device) for c, r in zip(chosen, rejected)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        idx = rng.sample(range(len(chosen)), min(batch_size, len(chosen)))
        pc, pr = pair_logps(model, [chosen[i] for i in idx], [rejected[i] for i in idx], pad_id, device)
        rc = torch.cat([ref[i][0] for i in idx])
        rr = torch.cat([ref[i][1] for i in idx])
        loss, _, _ = dpo_loss(pc, pr, rc, rr, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


class CaiStep:
    """The server's CAI step of a run: ``(round, aggregated state) -> new global state``."""

    def __init__(self, ctx) -> None:
        s = ctx.config.safety
        self.ctx, self.s = ctx, s
        self.prompts = [d.prompt for d in hh_splits(s.harmful_source, s.split_seed)["redteam"]]
        self.reviser = None  # loaded at the first round (a reviser model is not needed before)

    def _ids(self, prompt: str) -> list[int]:
        d = self.ctx.config.data
        return chat_ids(self.ctx.tokenizer, prompt, system_prompt=d.system_prompt,
                        use_chat_template=d.use_chat_template)

    def _example(self, prompt: str, answer: str) -> Example:
        tok = self.ctx.tokenizer
        target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        max_length = self.ctx.config.data.max_length
        return Example(self._ids(prompt)[-(max_length - min(len(target), max_length // 2)):],
                       target[: max_length // 2])

    def __call__(self, rnd: int, state: State) -> State:
        ctx, s = self.ctx, self.s
        model, device, pad_id = ctx.model, ctx.device, ctx.pad_id
        load_adapter_state(model, state)
        # In turn over the split, by round number: a resumed run continues where it stopped.
        prompts = [self.prompts[((rnd - 1) * s.cai_prompts + k) % len(self.prompts)] for k in range(s.cai_prompts)]
        meter = ComputeMeter(device, count_flops=ctx.config.train.count_flops)
        with meter:
            if self.reviser is None:
                self.reviser = make_reviser(s.cai_reviser, device, s.cai_max_new_tokens)
            answers = greedy_answers(model, ctx.tokenizer, [self._ids(p) for p in prompts],
                                     max_new_tokens=s.cai_max_new_tokens, batch_size=ctx.config.eval.batch_size,
                                     device=device)
            rows: list[dict[str, Any]] = []
            for k, (prompt, answer) in enumerate(zip(prompts, answers)):
                principle = principle_for(ctx.config.seed, rnd, k)
                critique, revision = self.reviser.revise(prompt, answer, principle)
                rows.append({"prompt": prompt, "answer": answer, "principle": principle.name, "critique": critique,
                             "revision": revision})
            model.train()
            kw = dict(steps=s.cai_steps, lr=s.cai_lr, batch_size=s.cai_batch_size, pad_id=pad_id,
                      seed=ctx.config.seed * 100_003 + rnd, device=device)
            revised = [self._example(r["prompt"], r["revision"]) for r in rows]
            if s.cai_dpo:
                first = [self._example(r["prompt"], r["answer"] or ".") for r in rows]
                losses = dpo_steps(model, revised, first, beta=s.cai_beta, **kw)
            else:
                losses = sft_steps(model, revised, **kw)
            new = adapter_state(model)
        folder = ctx.path / "safety"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"cai-round-{rnd}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ctx.log({"type": "server", "what": "cai", "round": rnd, "reviser": getattr(self.reviser, "name", None),
                 "mode": "dpo" if s.cai_dpo else "sft", "prompts": len(rows), "steps": len(losses),
                 "loss_first": losses[0], "loss_last": losses[-1], "seconds": meter.seconds,
                 "flops": meter.flops if ctx.config.train.count_flops else None})
        return new


def step_for(ctx) -> CaiStep | None:
    """The run's CAI step, or None with ``safety.cai`` off."""
    return CaiStep(ctx) if ctx.config.safety.cai else None
