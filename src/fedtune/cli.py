"""The `fedtune` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings

from . import __version__
from . import config as cfg


def _describe_config() -> str:
    """Every config key with its type, default and doc, for --help."""
    import ast
    import inspect

    lines = ["config keys (YAML sections, or --set section.key=value):"]
    for top in dataclasses.fields(cfg.Config):
        tp = typing.get_type_hints(cfg.Config)[top.name]
        if not dataclasses.is_dataclass(tp):
            lines.append(f"  {top.name} = {top.default!r}")
            continue
        lines.append(f"  {top.name}:")
        docs: dict[str, str] = {}
        # Field docstrings (a string literal right after the field) are the documentation.
        body = ast.parse(inspect.getsource(tp)).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
        inst = tp()
        for f in dataclasses.fields(tp):
            default = getattr(inst, f.name)
            doc = f"  {docs[f.name]}" if f.name in docs else ""
            lines.append(f"    {f.name} = {default!r}{doc}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated fine-tuning of LLMs: run, measure and compare FedLLM and friends.",
        epilog="Example: fedtune run examples/quickstart-tiny.yaml --set federation.rounds=3",
    )
    p.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="run one experiment described by a YAML config",
        description="Run one experiment and write its run folder (config.resolved.yaml, metrics.jsonl, "
        "summary.json, adapter/, plots/, report.md).",
        epilog=_describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("config", nargs="?", help="YAML config file (omit to use the defaults)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set federation.rounds=5")
    r.add_argument("--out", help="run folder (default runs/<name>-<timestamp>)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    r.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def main(argv: list[str] | None = None) -> int:
    # peft asks transformers a deprecated question on every save; the warning says nothing to our users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            from .experiment import run

            config = cfg.load(args.config, args.overrides)
            run(config, out=args.out, quiet=args.quiet)
        return 0
    except (ValueError, FileNotFoundError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
