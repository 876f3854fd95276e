"""What every paradigm's training uses, written once: adapter state in and out, the optimizer and its
clip-then-step, batch order and per-round seeds, the one token-level loss, the fast step runner, and
several clients' LoRA stacked in one pass. Nothing here knows a paradigm or a runtime."""
