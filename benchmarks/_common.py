"""What the benchmark scripts share: the path setup, the model shapes, random-weight model builders.

Every benchmark imports this module instead of another benchmark, so there is no import cycle among
``benchmarks/*.py``: scripts depend on `_common`, and `_common` on no script. Importing it puts the
repository's ``src/`` first on ``sys.path`` (the scripts run from a checkout without installing fedtune).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fedtune.data.tasks import Example  # noqa: E402

SHAPES: dict[str, dict] = {
    # SmolLM2-135M's architecture
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    # Llama-3.2-1B-like
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    # a 4-layer toy for CPU smoke runs (paradigm_throughput cuts it in the middle)
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
}
"""Llama shapes by name, as ``LlamaConfig`` keyword arguments."""

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
"""LoRA r=16 on every linear layer."""
SEQ = 512
"""Tokens per sequence of the GPU cases."""
LR = 1e-4
PAD = 0


def build(shape: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0, lora: bool = True):
    """A random-weight Llama of `shape` in `dtype`, frozen, with a seeded LoRA r=16 on every linear layer."""
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, attn_implementation="sdpa")
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    base.requires_grad_(False)
    if not lora:
        return base
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LORA)


def random_batches(n: int, batch: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """`n` batches of `batch` random sequences of ``SEQ`` tokens (ids from 1, so none is the pad id)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (batch, SEQ), generator=g) for _ in range(n)]


def as_examples(ids: torch.Tensor) -> list[Example]:
    """Full-sequence LM examples: every token after the first is a target (as ``labels=input_ids``)."""
    return [Example(prompt_ids=row[:1].tolist(), target_ids=row[1:].tolist()) for row in ids]


def free() -> None:
    """Collect garbage and return cached CUDA memory (between cases)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
