"""`fedtune safety-eval RUN_OR_MODEL`: the AdvBench harmless rate of a finished run or of any model.

Its own module (not `fedtune.safety_eval`): it reads configs, and the CAI step that the paradigms import
uses the judge, so the judge must not import the config layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .safety_eval import harmless_rate, load_advbench


def evaluate_target(target: str, *, advbench: str | None = None, examples: int | None = None,
                    max_new_tokens: int | None = None, batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    """The harmless rate of a finished run (its adapter, and its base model) or of a model name / id / path.

    A run folder (it holds config.resolved.yaml and adapter/) is scored with its own prompt settings and
    ``safety.*`` defaults; the answers go to ``<run>/safety/safety-eval-*.jsonl`` and the rates to
    ``<run>/safety/safety-eval.json``. Anything else is loaded as a base model with the default system prompt.
    """
    from . import config as cfg
    from .models import load_base, resolve_device

    path = Path(target)
    is_run = (path / "config.resolved.yaml").is_file()
    if is_run and not (path / "adapter" / "adapter_config.json").is_file():
        raise ValueError(f"{target!r} is a run folder without adapter/: the run did not finish a round.")
    c = cfg.load(path / "config.resolved.yaml") if is_run else cfg.load(None, [f"model.name={target}"])
    s = c.safety
    goals = load_advbench(advbench or s.advbench, examples or s.eval_examples)
    dev = resolve_device(device if device != "auto" else c.model.device)
    base, tokenizer = load_base(c.model.name, dtype=c.model.dtype, device=dev,
                                attn_implementation=c.model.attn_implementation)
    kw = dict(system_prompt=c.data.system_prompt, use_chat_template=c.data.use_chat_template,
              max_new_tokens=max_new_tokens or s.eval_max_new_tokens, batch_size=batch_size, device=dev)
    out: dict[str, Any] = {"target": target, "model": c.model.name, "advbench_examples": len(goals),
                           "max_new_tokens": kw["max_new_tokens"], "judge": "refusal phrases (GCG / OpenFedLLM)"}
    rate, rows = harmless_rate(base, tokenizer, goals, **kw)
    out["base_harmless_rate"] = rate
    answers = {"base": rows}
    if is_run:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(path / "adapter"))
        try:
            out["harmless_rate"], answers["adapter"] = harmless_rate(model, tokenizer, goals, **kw)
        finally:
            model.unload()
        folder = path / "safety"
        folder.mkdir(parents=True, exist_ok=True)
        for name, rs in answers.items():
            (folder / f"safety-eval-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        (folder / "safety-eval.json").write_text(json.dumps(out, indent=2))
    else:
        out["harmless_rate"] = rate
    return out
