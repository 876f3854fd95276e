"""The inference-only model service: losses and logits for batches of token ids, never weights.

A black-box client (FedBPT) sees the model only through this interface. Two requests, each one
`wire`-encoded Message each way (safetensors bytes, no pickle):

  method  request tensors (meta)                                  reply
  Info    - ()                                                    meta: hidden_size, vocab_size, embedding_std,
                                                                  max_tokens, max_top_k
  Infer   input_ids (b, s) int32, attention_mask (b, s) bool,     loss (n, b) float32: each example's mean token
          labels (b, s) int32 (optional; -100 = not a target),    loss (with labels); scores (n, b, c) float32:
          soft_prompt (n, p, hidden) float32 (optional),          the logits of the candidate tokens at position
          prompt_ids (p,) int32 (with soft_prompt),               `last` (with candidates); top_ids/top_values
          last (b,) int32 + candidates (c,) int32 (optional)      (n, b, k): the top-k there (meta top_k)
          (meta: top_k)

A soft prompt is prepended to every sequence of the batch: its p vectors are added to the embeddings
of ``prompt_ids`` (so a zero soft prompt is the text of those ids) and placed before the sequence;
n soft prompts are scored against the same batch in one request. No weight, gradient or hidden state
is ever returned; every request is validated (names, dtypes, shapes, id ranges, finite values, size
limits) and a bad one is refused with a `WireError` that says why.

`ModelServer` does the work; `LocalModelService` serves it in this process (the simulation: every
message still goes through encode/decode, so the bytes are exact and nothing but bytes crosses);
`fedtune.runtime.model_service` serves the very same `ModelServer` over gRPC. Callers use `ModelAPI`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from .data.tasks import IGNORE
from .meter import ComputeMeter
from .models import backbone
from .train.losses import mean_token_loss
from .wire import Message, WireError, check, decode, encode

MAX_TOKENS = 65_536
"""Largest n * b * (p + s) one Infer request may ask for."""
MAX_TOP_K = 64


class ModelServer:
    """Answers Info and Infer requests on a frozen causal LM (`model`), counting the FLOPs it spends.

    Args:
        model: The base model (a PEFT model is used with its adapter disabled).
        device: Where it runs.
        count_flops: Count the FLOPs of every request (FlopCounterMode).
    """

    def __init__(self, model, device: torch.device, *, count_flops: bool = True, max_tokens: int = MAX_TOKENS
                 ) -> None:
        self.model, self.device, self.count_flops, self.max_tokens = model, device, count_flops, max_tokens
        body = backbone(model).config
        self.hidden, self.vocab = body.hidden_size, body.vocab_size
        self.flops = 0

    def _base(self):
        return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()

    def info(self) -> Message:
        emb = self.model.get_input_embeddings().weight
        return Message({}, {"kind": "model_info", "hidden_size": self.hidden, "vocab_size": self.vocab,
                            "embedding_std": float(emb.float().std()), "max_tokens": self.max_tokens,
                            "max_top_k": MAX_TOP_K})

    def handle(self, method: str, msg: Message) -> Message:
        """One request; `WireError` for a malformed one (the service stays up)."""
        if method == "Info":
            return self.info()
        if method != "Infer":
            raise WireError(f"unknown method {method!r}: Info or Infer")
        return self.infer(msg)

    def _validate(self, msg: Message) -> tuple[int, int, int, int]:
        t = msg.tensors
        allowed = {"input_ids", "attention_mask", "labels", "soft_prompt", "prompt_ids", "last", "candidates"}
        if set(t) - allowed:
            raise WireError(f"unexpected tensors {sorted(set(t) - allowed)}; allowed: {sorted(allowed)}")
        ids = t.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.numel() == 0:
            raise WireError(f"input_ids must be a non-empty (batch, seq) int32 tensor, got "
                            f"{None if ids is None else tuple(ids.shape)}")
        b, s = ids.shape
        spec = {"input_ids": ((b, s), torch.int32), "attention_mask": ((b, s), torch.bool)}
        if "labels" in t:
            spec["labels"] = ((b, s), torch.int32)
        n, p = 1, 0
        if "soft_prompt" in t:
            sp = t["soft_prompt"]
            if sp.dim() != 3 or sp.shape[-1] != self.hidden or sp.shape[0] < 1 or sp.shape[1] < 1:
                raise WireError(f"soft_prompt must have shape (prompts, length, {self.hidden}), got {tuple(sp.shape)}")
            n, p = int(sp.shape[0]), int(sp.shape[1])
            spec.update(soft_prompt=((n, p, self.hidden), torch.float32), prompt_ids=((p,), torch.int32))
        elif "prompt_ids" in t:
            raise WireError("prompt_ids come with a soft_prompt")
        if ("last" in t) != ("candidates" in t) and "candidates" in t:
            raise WireError("candidates need last (the position to score them at)")
        if "last" in t:
            spec["last"] = ((b,), torch.int32)
        if "candidates" in t:
            c = t["candidates"]
            if c.dim() != 1 or not 1 <= len(c) <= MAX_TOP_K:
                raise WireError(f"candidates must be 1 to {MAX_TOP_K} token ids")
            spec["candidates"] = ((len(c),), torch.int32)
        check(msg, spec)
        for name in ("input_ids", "prompt_ids", "candidates"):
            if name in t and (int(t[name].min()) < 0 or int(t[name].max()) >= self.vocab):
                raise WireError(f"{name} must be token ids in [0, {self.vocab})")
        if "labels" in t:
            lab = t["labels"]
            if bool(((lab != IGNORE) & ((lab < 0) | (lab >= self.vocab))).any()):
                raise WireError(f"labels must be token ids in [0, {self.vocab}) or {IGNORE}")
        if "last" in t and (int(t["last"].min()) < 0 or int(t["last"].max()) >= s):
            raise WireError(f"last must be positions in [0, {s})")
        k = msg.meta.get("top_k", 0)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_K or (k and "last" not in t):
            raise WireError(f"top_k must be an integer in [0, {MAX_TOP_K}] (with last), got {k!r}")
        if n * b * (p + s) > self.max_tokens:
            raise WireError(f"the request asks for {n * b * (p + s)} tokens, more than the service's {self.max_tokens}")
        return n, b, s, p

    @torch.no_grad()
    def infer(self, msg: Message) -> Message:
        n, b, s, p = self._validate(msg)
        t = {k: v.to(self.device) for k, v in msg.tensors.items()}
        meter = ComputeMeter(self.device, count_flops=self.count_flops)
        with meter, self._base():
            embed = self.model.get_input_embeddings()
            x = embed(t["input_ids"].long())  # (b, s, h)
            mask = t["attention_mask"].long()
            if p:
                prefix = embed(t["prompt_ids"].long())[None] + t["soft_prompt"].to(x.dtype)  # (n, p, h)
                x = torch.cat([prefix[:, None].expand(n, b, p, self.hidden), x[None].expand(n, b, s, self.hidden)],
                              dim=2).reshape(n * b, p + s, self.hidden)
                mask = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], 1).repeat(n, 1)
            hidden = backbone(self.model)(inputs_embeds=x, attention_mask=mask).last_hidden_state
            out: dict[str, torch.Tensor] = {}
            if "labels" in t:
                labels = t["labels"].long()
                if p:
                    pad = torch.full((b, p), IGNORE, dtype=labels.dtype, device=labels.device)
                    labels = torch.cat([pad, labels], 1).repeat(n, 1)
                if not bool((labels[:, 1:] != IGNORE).any(1).all()):
                    raise WireError("every example needs at least one target token in labels")
                loss = mean_token_loss(self.model, hidden, labels, groups=n * b,
                                       sample_group=torch.arange(n * b, device=hidden.device))
                out["loss"] = loss.float().reshape(n, b)
            if "last" in t:
                last = (t["last"].long() + p).repeat(n)
                h = hidden[torch.arange(n * b, device=hidden.device), last]
                head = self.model.get_output_embeddings()
                if "candidates" in t:
                    out["scores"] = (h @ head.weight[t["candidates"].long()].T).float().reshape(n, b, -1)
                k = int(msg.meta.get("top_k", 0))
                if k:
                    values, ids = head(h).float().topk(k, dim=-1)
                    out["top_values"], out["top_ids"] = values.reshape(n, b, k), ids.to(torch.int32).reshape(n, b, k)
        self.flops += meter.flops or 0
        return Message({k: v.cpu() for k, v in out.items()}, {"kind": "infer_res", "flops": meter.flops})

    def take_flops(self) -> int:
        out, self.flops = self.flops, 0
        return out


Transport = Callable[[str, bytes], bytes]
"""``(method, request payload) -> reply payload``: the only thing a caller holds of the service."""


class ModelAPI:
    """A caller's side of the model service: typed requests, exact byte counts (``len`` of the payloads).

    Holds nothing but its transport (a function of bytes) and counters: no model, no tensor of weights.
    """

    def __init__(self, transport: Transport, *, max_bytes: int = 256 * 1024**2) -> None:
        self.transport = transport
        self.max_bytes = max_bytes
        self.bytes_up = self.bytes_down = self.calls = 0
        self.flops = 0

    def _call(self, method: str, msg: Message) -> Message:
        raw = encode(msg)
        self.bytes_up += len(raw)
        reply = self.transport(method, raw)
        self.bytes_down += len(reply)
        self.calls += 1
        out = decode(reply, max_bytes=self.max_bytes)
        self.flops += int(out.meta.get("flops") or 0)
        return out

    def info(self) -> dict:
        return self._call("Info", Message({}, {"kind": "model_info_req"})).meta

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, labels: torch.Tensor | None = None,
              soft_prompt: torch.Tensor | None = None, prompt_ids: torch.Tensor | None = None,
              last: torch.Tensor | None = None, candidates: torch.Tensor | None = None,
              top_k: int = 0) -> dict[str, torch.Tensor]:
        tensors = {"input_ids": input_ids.to(torch.int32), "attention_mask": attention_mask.bool()}
        for name, v in (("labels", labels), ("last", last), ("candidates", candidates), ("prompt_ids", prompt_ids)):
            if v is not None:
                tensors[name] = v.to(torch.int32)
        if soft_prompt is not None:
            tensors["soft_prompt"] = soft_prompt.detach().float()
        return self._call("Infer", Message(tensors, {"kind": "infer", "top_k": top_k})).tensors

    def traffic(self) -> dict[str, int]:
        return {"api_bytes_up": self.bytes_up, "api_bytes_down": self.bytes_down, "api_calls": self.calls,
                "api_flops": self.flops}


class LocalModelService:
    """The model service in this process: `connect` gives a caller a `ModelAPI` whose transport is bytes in,
    bytes out (decoded and re-encoded here, as over a network), so callers never touch the model."""

    def __init__(self, model, device: torch.device, *, count_flops: bool = True) -> None:
        self._model, self._device, self._count_flops = model, device, count_flops
        self._server: ModelServer | None = None

    @property
    def server(self) -> ModelServer:
        if self._server is None:  # built on first use: other paradigms never pay for it
            self._server = ModelServer(self._model, self._device, count_flops=self._count_flops)
        return self._server

    def connect(self, identity: str) -> ModelAPI:
        def transport(method: str, raw: bytes) -> bytes:
            return encode(self.server.handle(method, decode(raw, max_bytes=64 * 1024**2)))

        return ModelAPI(transport)


def finite_mean(values: list[float]) -> float:
    """Mean of finite values (inf when none): a candidate whose loss is not finite loses."""
    good = [v for v in values if math.isfinite(v)]
    return sum(good) / len(good) if good else math.inf
