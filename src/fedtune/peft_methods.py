"""The PEFT methods fedtune federates (``peft.method``), built through the `peft` library.

Two families, which differ in where the adapter lives:

* **injected** (``lora``, ``dora``, ``rslora``, ``ffa_lora``, ``ia3``): small modules inside the frozen
  Linear layers. The transformer body runs as usual, so every fast path (CUDA graphs, split learning's
  bottom and top halves) sees them. FFA-LoRA (Sun et al., 2024) is LoRA with A frozen at its seeded
  initialisation: only B trains and travels, and every party rebuilds the same A from the run seed.
* **prompt learning** (``prefix``, ``prompt``, ``ptuning``): virtual tokens before the input, as input
  embeddings (prompt tuning, P-tuning) or as keys and values in every layer (prefix tuning). They act in
  `PeftModel.forward`, so `prompt_hidden_states` builds the same inputs for fedtune's own forward.

What travels is the adapter's trainable state: the parameters with ``requires_grad``
(`fedtune.train.adapter.adapter_params`). For the injected methods these are PEFT's own state-dict
entries (B only for FFA-LoRA); for P-tuning they are the prompt encoder's weights, of which PEFT saves
only the output (the virtual-token embeddings), so the saved adapter is the inference form.
"""

from __future__ import annotations

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from . import registry

INJECTED = ("lora", "dora", "rslora", "ffa_lora", "ia3")
PROMPT_LEARNING = ("prefix", "prompt", "ptuning")
METHODS = INJECTED + PROMPT_LEARNING
LORA_FAMILY = ("lora", "dora", "rslora", "ffa_lora")
PLAIN_LORA = ("lora", "rslora")
"""Plain LoRA on Linear layers: what the batched-clients pass and heterogeneous ranks handle."""
GRAPH_SAFE = ("lora", "rslora", "ffa_lora")
"""Methods whose step runs as a captured CUDA graph; the others run their steps eagerly on CUDA."""
FEEDFORWARD = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp")


def peft_config(p, target_modules: list[str]):
    """The `peft` config of a `fedtune.config.PeftConfig` (``target_modules`` checked by the caller)."""
    m = p.method
    if m in LORA_FAMILY:
        return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=target_modules,
                          use_dora=m == "dora", use_rslora=m == "rslora", task_type="CAUSAL_LM")
    if m == "ia3":
        return IA3Config(target_modules=target_modules, task_type="CAUSAL_LM",
                         feedforward_modules=[t for t in target_modules if t in FEEDFORWARD])
    if m == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM")
    if m == "prompt":
        return PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM")
    if m == "ptuning":
        return PromptEncoderConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM",
                                   encoder_hidden_size=p.encoder_hidden_size)
    raise ValueError(f"peft.method = {m!r} is not allowed: choose one of {', '.join(METHODS)}.")


def after_attach(model, method: str) -> None:
    """Finish a fresh PEFT model: FFA-LoRA's A frozen; prompt learning's ``unload`` (the base is untouched)."""
    if method == "ffa_lora":
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if method in PROMPT_LEARNING:
        # Prompt learning injects nothing into the base, so giving it back is returning it; LoRA's PeftModel
        # has `unload`, and every caller ends a run with it.
        base = model.base_model
        object.__setattr__(model, "unload", lambda: base)


def graph_safe(model) -> bool:
    """Whether the CUDA-graph step runner may capture `model`'s step: plain LoRA (also rsLoRA, FFA-LoRA).

    DoRA, IA3 and prompt learning run eagerly: their forwards (DoRA's weight norms, prefix tuning's
    key-value cache built every step) were not validated under capture.
    """
    config = getattr(model, "active_peft_config", None)
    return config is None or (config.peft_type.value == "LORA" and not getattr(config, "use_dora", False))


def is_prompt_learning(model) -> bool:
    """Whether `model` is a PEFT model with an enabled prompt-learning adapter."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning and not getattr(model, "_adapters_disabled", False))


def prompt_hidden_states(model, body: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The body's last hidden states at the input's positions, with the virtual tokens of a prompt-learning
    adapter in front, built as `PeftModel.forward` builds them (so generation and a reloaded adapter agree).

    Prompt and P-tuning prepend the virtual tokens' embeddings; prefix tuning passes them as every layer's
    past keys and values. The returned states cover the input's positions only: ``(batch, seq, hidden)``.
    """
    config = model.active_peft_config
    n, batch, width = config.num_virtual_tokens, input_ids.shape[0], input_ids.shape[1]
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    if config.peft_type.value == "PREFIX_TUNING":
        cache = model.get_prompt(batch, max_cache_len=width + n)
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                    **{_cache_argument(): cache}).last_hidden_state
    embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
    out = body(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=attention_mask).last_hidden_state
    return out[:, n:]


def _cache_argument() -> str:
    """The name transformers gives a forward's key-value cache (``cache`` from 5.24, ``past_key_values`` before)."""
    try:
        from peft.import_utils import get_transformers_cache_name
    except ImportError:  # peft before 0.18 knows only the old name
        return "past_key_values"
    return get_transformers_cache_name()


def validate(c) -> None:
    """Checks across sections for ``peft.*`` and ``model.quantization`` (ValueError naming the field and the fix)."""
    p, f = c.peft, c.federation
    if p.method not in METHODS:
        raise ValueError(f"peft.method = {p.method!r} is not allowed: choose one of {', '.join(METHODS)}.")
    if p.method in PROMPT_LEARNING and p.num_virtual_tokens < 1:
        raise ValueError(f"peft.num_virtual_tokens = {p.num_virtual_tokens!r} is not allowed: a positive integer.")
    if p.method == "ptuning" and p.encoder_hidden_size < 1:
        raise ValueError(f"peft.encoder_hidden_size = {p.encoder_hidden_size!r} is not allowed: a positive integer.")
    if c.runtime.batch_clients > 1 and p.method not in PLAIN_LORA:
        raise ValueError(f"runtime.batch_clients = {c.runtime.batch_clients} trains plain LoRA only (peft.method "
                         f"lora or rslora), not peft.method = {p.method!r}: set runtime.batch_clients=1.")
    q = c.model.quantization
    if q != "none" and c.model.device == "cpu":
        raise ValueError(f"model.quantization = {q!r} needs a CUDA GPU (bitsandbytes' 4- and 8-bit kernels), but "
                         "model.device = 'cpu': set model.quantization=none, or run on a GPU.")
    ranked = p.client_ranks is not None or p.aggregation != "separate"
    if not ranked:
        return
    if p.method not in PLAIN_LORA:
        raise ValueError(f"peft.client_ranks / peft.aggregation = {p.aggregation!r} need plain LoRA (peft.method "
                         f"lora or rslora), not {p.method!r}: set peft.method=lora or peft.aggregation=separate.")
    if not registry.get(f.paradigm).lora_ranks:
        allowed = [n for n in registry.names() if registry.get(n).lora_ranks]
        raise ValueError(f"peft.client_ranks / peft.aggregation = {p.aggregation!r} apply to federation.paradigm "
                         f"{' or '.join(allowed)}, not {f.paradigm!r}.")
    for field, on in (("privacy.dp", getattr(getattr(c, "privacy", None), "dp", "none") != "none"),
                      ("compression.kind", getattr(getattr(c, "compression", None), "kind", "none") != "none"),
                      ("federation.strategy=scaffold", f.strategy == "scaffold"),
                      ("secagg.enabled", getattr(getattr(c, "secagg", None), "enabled", False))):
        if on:
            raise ValueError(f"{field} does not apply to the rank-aware round loop of peft.client_ranks / "
                             f"peft.aggregation = {p.aggregation!r} yet: turn {field} off, or use one rank "
                             "(peft.client_ranks=null, peft.aggregation=separate).")
    if c.runtime.batch_clients > 1:
        raise ValueError(f"runtime.batch_clients = {c.runtime.batch_clients} stacks clients of one rank: with "
                         "peft.client_ranks or a rank-aware peft.aggregation set runtime.batch_clients=1.")
    if p.client_ranks is not None:
        if not p.client_ranks or any(not isinstance(r, int) or not 1 <= r <= p.r for r in p.client_ranks):
            raise ValueError(f"peft.client_ranks = {p.client_ranks!r} is not allowed: a non-empty list of ranks "
                             f"between 1 and peft.r ({p.r}). Raise peft.r to the largest client rank.")
        if p.aggregation == "separate" and len(set(p.client_ranks)) > 1:
            raise ValueError(f"peft.aggregation = 'separate' cannot average adapters of different ranks "
                             f"(peft.client_ranks = {p.client_ranks}): choose zero_pad or flexlora.")
    if p.aggregation == "flexlora" and f.strategy != "fedavg":
        raise ValueError(f"peft.aggregation = {p.aggregation!r} averages the products B·A with FedAvg's weights; "
                         f"federation.strategy = {f.strategy!r} is not supported with it: set "
                         "federation.strategy=fedavg, or peft.aggregation=zero_pad (any strategy).")
    if c.runtime.world_size > 1:
        raise ValueError("peft.client_ranks / a rank-aware peft.aggregation run in one process: set "
                         "runtime.world_size=1.")


def client_rank(p, node: int) -> int:
    """The LoRA rank client `node` trains (``peft.client_ranks`` cycled over the clients, else ``peft.r``)."""
    return p.client_ranks[node % len(p.client_ranks)] if p.client_ranks else p.r


def ranks_apply(c) -> bool:
    """Whether a run's clients train LoRA ranks of their own or the server aggregates rank-aware
    (``peft.client_ranks`` or ``peft.aggregation`` other than ``separate``: `fedtune.paradigms.fedpeft_ranks`)."""
    return c.peft.client_ranks is not None or c.peft.aggregation != "separate"


def ranked_in(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's rank-r_k LoRA state zero-padded to the shared model's rank (the padding stays zero in training:
    its gradients are zero, as A's padded rows meet B's zero columns)."""
    from .lora_aggregation import rank_of, zero_pad
    from .train.adapter import adapter_params

    return zero_pad(state, rank_of(dict(adapter_params(model))))
