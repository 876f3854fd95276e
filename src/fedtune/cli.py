"""The `fedtune` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings

from .version import __version__
from . import config as cfg


def _describe_config() -> str:
    """Every config key with its type, default and doc, for --help."""
    import ast
    import inspect

    def field_docs(body: list) -> dict[str, str]:
        # Field docstrings (a string literal right after the field) are the documentation.
        return {a.target.id: " ".join(str(b.value.value).split()) for a, b in zip(body, body[1:])
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}

    # The root Config as written in config.py (the class in use is rebuilt with the registered sections).
    root = next(n for n in ast.parse(inspect.getsource(cfg)).body if isinstance(n, ast.ClassDef) and n.name == "Config")
    top_docs = field_docs(root.body)
    lines = ["config keys (YAML sections, or --set section.key=value):"]
    for top in dataclasses.fields(cfg.Config):
        tp = typing.get_type_hints(cfg.Config)[top.name]
        if not dataclasses.is_dataclass(tp):
            doc = f"  {top_docs[top.name]}" if top.name in top_docs else ""
            lines.append(f"  {top.name} = {top.default!r}{doc}")
            continue
        lines.append(f"  {top.name}:")
        docs = field_docs(ast.parse(inspect.getsource(tp)).body[0].body)
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

    cp = sub.add_parser(
        "compare",
        help="run the same experiment under several frameworks (and a sweep) and compare them",
        description="Run CONFIG under each framework with the same model, data, partition, seed and round "
        "budget (optionally over a sweep of one or two keys) and write comparison.json, comparison.md and "
        "plots/ (accuracy per round, accuracy vs communication, client compute vs accuracy).",
        epilog="Examples: fedtune compare examples/quickstart-tiny.yaml --paradigms fedpeft,split "
        "--sweep peft.r=4,8 --out runs/cmp\n"
        "          fedtune compare examples/demo.yaml --tune train.lr=3e-4,1e-3,3e-3 --tune-rounds 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cp.add_argument("config", nargs="?", help="YAML config file (omit to use the defaults)")
    cp.add_argument("--paradigms", default="fedpeft,kd,split",
                    help="comma-separated frameworks (default fedpeft,kd,split; also fedprox, centralized, fedkseed, "
                    "offsite, fedbpt)")
    cp.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                    help="sweep one config key over values (repeat for a second key), e.g. peft.r=4,8,16")
    cp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value for every run (repeatable)")
    cp.add_argument("--set-for", dest="set_for", action="append", default=[], metavar="PARADIGM:SECTION.KEY=VALUE",
                    help="override one config value for one framework's runs only (repeatable), e.g. "
                    "kd:train.lr=1e-3; the YAML's compare.lr sets each framework's train.lr the same way")
    cp.add_argument("--tune", metavar="SECTION.KEY=V1,V2",
                    help="tune one numeric key per framework, e.g. train.lr=1e-4,3e-4,1e-3: one run per value "
                    "on a validation split of the training data (tuning/<run>-<value>/), then the final run at "
                    "the best value on the test set")
    cp.add_argument("--tune-rounds", type=int, metavar="N",
                    help="federation.rounds of the tuning runs (default: the same as the final runs)")
    cp.add_argument("--out", default="runs/compare", help="comparison folder (default runs/compare)")
    cp.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    cp.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    ss = sub.add_parser(
        "split-server",
        help="serve split learning's main server (the top of the model) over gRPC",
        description="Load the model of a split config exactly as `fedtune run` does and serve its top part to "
        "the clients of a run whose runtime.split_server points here. Callers authenticate with a bearer token "
        "(--token-file) and/or a client certificate signed by --tls-ca.",
        epilog="Example: fedtune split-server --config split.yaml --port 50051 --tls-cert server.pem "
        "--tls-key server.key --tls-ca ca.pem --token-file tokens.txt",
    )
    ss.add_argument("--config", help="the run's YAML config (omit to use the defaults)")
    ss.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value (repeatable); use the same ones as the run")
    ss.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    ss.add_argument("--port", type=int, required=True, help="port to listen on (0 picks a free one, printed)")
    ss.add_argument("--tls-cert", help="the service's certificate (PEM); with --tls-key turns TLS on")
    ss.add_argument("--tls-key", help="the service's private key (PEM)")
    ss.add_argument("--tls-ca", help="CA (PEM) whose client certificates are required (mutual TLS; the "
                    "certificate's CN must be the caller's identity: node-<id> or fed-server)")
    ss.add_argument("--token-file", help="lines `<identity> <token>`; callers send `authorization: Bearer <token>`")
    ss.add_argument("--insecure-tokens", action="store_true",
                    help="allow tokens without TLS on an address other than loopback (they travel in clear text)")
    ss.add_argument("--idle-timeout", type=float, default=300.0,
                    help="seconds a client's stream may send nothing before it is cut off (default 300)")
    ss.add_argument("--max-message-mb", type=float, default=256.0,
                    help="largest message accepted or sent, in MiB (default 256)")
    ss.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    ms = sub.add_parser(
        "model-server",
        help="serve a base model as an inference-only service (losses and logits, never weights) over gRPC",
        description="Load the base model of a config (model.*) and answer Info and Infer requests of black-box "
        "clients (federation.paradigm fedbpt, runtime.model_server pointing here). Callers authenticate with a "
        "bearer token (--token-file) and/or a client certificate signed by --tls-ca.",
        epilog="Example: fedtune model-server --config fedbpt.yaml --port 50052 --tls-cert server.pem "
        "--tls-key server.key --token-file tokens.txt",
    )
    for action in ss._actions:  # the same options as split-server
        if action.dest != "help":
            ms._add_action(action)
    _add_ecosystem_verbs(sub)

    se = sub.add_parser(
        "safety-eval",
        help="AdvBench harmless rate of a run's adapter (and its base model) or of any model",
        description="Answer AdvBench's harmful behaviours greedily and judge each answer by refusal phrases "
        "(harmless if any occurs; fedtune.safety_eval.REFUSAL_PHRASES). RUN_OR_MODEL is a run folder (its adapter and "
        "its base are scored with the run's prompt settings) or a model name, Hugging Face id or local path.",
        epilog="Example: fedtune safety-eval runs/responsible/fedavg-harmful --examples 520",
    )
    se.add_argument("target", metavar="RUN_OR_MODEL", help="a run folder, or a model name / HF id / local path")
    se.add_argument("--advbench", help="harmful_behaviors.csv (default: the run's safety.advbench)")
    se.add_argument("--examples", type=int, help="behaviours answered, evenly spaced over the 520 (default 100)")
    se.add_argument("--max-new-tokens", type=int, help="answer length judged (default 32)")
    se.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (default 32)")
    se.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    se.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def _add_ecosystem_verbs(sub) -> None:
    """`report`, `advise` and `examples`: verbs that read run folders, measured tables and shipped files."""
    rp = sub.add_parser(
        "report",
        help="rebuild report.md/report.html/plots from run folders, or compare runs made separately",
        description="Rebuild summary.json, report.md, report.html and plots/ of run folders from their metrics.jsonl "
        "and config.resolved.yaml (nothing is re-run). One comparison folder is rebuilt in place "
        "(comparison.md, comparison.html, plots/); several folders give one comparison of all their runs in --out.",
        epilog="Examples: fedtune report runs/quick\n          fedtune report runs/a runs/b --out runs/a-vs-b",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument("folders", nargs="+", metavar="RUN_DIR", help="run folders or comparison folders")
    rp.add_argument("--out", help="where the comparison of several folders goes (default runs/report)")
    rp.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    ad = sub.add_parser(
        "advise",
        help="rank the frameworks that fit your constraints, from measured comparisons",
        description="Given a federation's constraints, rank the frameworks that fit them by their measured accuracy "
        "gain, and say why, citing the numbers: from `fedtune compare` folders (--from), or from the table measured "
        "on the demo task that ships with fedtune.",
        epilog="Example: fedtune advise --client-memory 1.5GiB --uplink 5MB --access white --server per-round",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ad.add_argument("--from", dest="sources", action="append", default=[], metavar="DIR",
                    help="a fedtune compare folder (repeatable; default: the bundled demo-task table)")
    ad.add_argument("--client-memory", metavar="SIZE", help="memory a client can give to training, e.g. 2GiB")
    ad.add_argument("--uplink", metavar="SIZE", help="bytes a client may send per round, e.g. 1MB")
    ad.add_argument("--access", choices=["white", "gray", "black"], default="white",
                    help="the most clients may see of the model: white (weights), gray (an emulator), black "
                    "(an inference API only); default white")
    ad.add_argument("--server", choices=["every-step", "per-round"], default="every-step",
                    help="whether the server can be online at every training step or only between rounds "
                    "(default every-step)")
    ad.add_argument("--epsilon", type=float, help="a client-level differential-privacy budget")
    ad.add_argument("--json", action="store_true", help="print the ranking as JSON")
    ad.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    ex = sub.add_parser(
        "examples",
        help="list the example configs that ship with fedtune, or copy them into a folder",
        description="List the example configs installed with fedtune (each starts with the command that runs it), "
        "or copy them (all, or the named ones) into a folder.",
        epilog="Examples: fedtune examples\n          fedtune examples --copy-to examples quickstart-tiny demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("names", nargs="*", metavar="NAME", help="examples to copy (default: all)")
    ex.add_argument("--copy-to", metavar="DIR", help="copy the examples into DIR")
    ex.add_argument("--force", action="store_true", help="overwrite files already in DIR")
    ex.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def _advise(args) -> None:
    """The `advise` verb."""
    import json
    from pathlib import Path

    from .advise import Constraints, bundled, from_comparison, parse_size, rank, report_lines

    c = Constraints(client_memory=parse_size(args.client_memory, "--client-memory") if args.client_memory else None,
                    uplink=parse_size(args.uplink, "--uplink") if args.uplink else None, access=args.access,
                    server_every_step=args.server == "every-step", epsilon=args.epsilon)
    if args.sources:
        rows = [r for folder in args.sources for r in from_comparison(Path(folder))]
        source = ", ".join(args.sources)
    else:
        source, rows = bundled()
    fit, excluded = rank(rows, c)
    if args.json:
        print(json.dumps({"fit": [{"run": v.row["run"], "reasons": v.reasons, **v.row} for v in fit],
                          "excluded": [{"run": v.row["run"], "reasons": v.reasons} for v in excluded]}, indent=2))
    else:
        print("\n".join(report_lines(fit, excluded, c, source)))


def _examples(args) -> None:
    """The `examples` verb."""
    from .examples_cli import copy, listing

    if args.copy_to is None:
        if args.names:
            raise ValueError("fedtune examples NAME needs --copy-to DIR (without names it lists them).")
        print(listing())
        return
    for path in copy(args.names, args.copy_to, force=args.force):
        print(f"wrote {path}")


def _split_server(args) -> None:
    """The `split-server` verb: build the service from the config and serve until interrupted."""
    from pathlib import Path

    from .runtime.split_auth import CLEAR_TEXT, ServerSecurity, is_loopback, read_token_file
    from .runtime.split_service import build_service, start_server

    def read(flag: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise ValueError(f"{flag} {path}: {err.strerror}") from None

    if args.max_message_mb <= 0:
        raise ValueError(f"--max-message-mb = {args.max_message_mb} must be positive.")
    security = ServerSecurity(read("--tls-cert", args.tls_cert), read("--tls-key", args.tls_key),
                              read("--tls-ca", args.tls_ca),
                              read_token_file(args.token_file) if args.token_file else None)
    security.check()  # before the model is loaded
    if args.idle_timeout <= 0:
        raise ValueError(f"--idle-timeout = {args.idle_timeout} must be a positive number of seconds.")
    if security.tokens and not security.cert and not is_loopback(args.host) and not args.insecure_tokens:
        raise ValueError(f"--token-file without --tls-cert/--tls-key on --host {args.host}: {CLEAR_TEXT}. Give the "
                         "service a certificate, listen on 127.0.0.1, or pass --insecure-tokens on a network you trust.")
    config = cfg.load(args.config, args.overrides)
    service = build_service(config, max_bytes=int(args.max_message_mb * 1024**2), tokens=security.tokens,
                            mtls=security.ca is not None, idle_timeout=args.idle_timeout)
    server, port = start_server(service, f"{args.host}:{args.port}", security)
    modes = [m for m, on in [("TLS", security.cert), ("client certificates", security.ca),
                             ("tokens", security.tokens)] if on]
    if security.tokens and not security.cert:
        print(f"fedtune split-server: warning: {CLEAR_TEXT} (give --tls-cert/--tls-key)", file=sys.stderr)
    print(f"fedtune split-server: listening on {args.host}:{port} ({', '.join(modes)})", flush=True)
    serve_until_stopped(server)


def serve_until_stopped(server) -> None:
    """Keep a started gRPC server up until SIGTERM or Ctrl-C, then stop it (2 s grace for calls in flight)."""
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=2).wait()


def _model_server(args) -> None:
    """The `model-server` verb: the inference-only model service, until interrupted."""
    from pathlib import Path

    from .runtime.model_service import build_service, start_server
    from .runtime.split_auth import ServerSecurity, read_token_file

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    if args.max_message_mb <= 0:
        raise ValueError(f"--max-message-mb = {args.max_message_mb} must be positive.")
    try:
        security = ServerSecurity(read(args.tls_cert), read(args.tls_key), read(args.tls_ca),
                                  read_token_file(args.token_file) if args.token_file else None)
    except OSError as err:
        raise ValueError(f"{err.filename}: {err.strerror}") from None
    security.check()
    config = cfg.load(args.config, args.overrides)
    service = build_service(config, tokens=security.tokens, mtls=security.ca is not None,
                            max_bytes=int(args.max_message_mb * 1024**2))
    server, port = start_server(service, f"{args.host}:{args.port}", security)
    if security.tokens and not security.cert:
        print("fedtune model-server: warning: tokens travel in clear text without --tls-cert/--tls-key",
              file=sys.stderr)
    print(f"fedtune model-server: listening on {args.host}:{port}", flush=True)
    serve_until_stopped(server)


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
            from .launch import run

            config = cfg.load(args.config, args.overrides)
            run(config, out=args.out, quiet=args.quiet)
        elif args.command == "compare":
            from .compare import compare

            compare(args.config, overrides=args.overrides, paradigms=[p.strip() for p in args.paradigms.split(",")],
                    sweep=args.sweep, set_for=args.set_for, tune=args.tune, tune_rounds=args.tune_rounds,
                    out=args.out, quiet=args.quiet)
        elif args.command == "split-server":
            _split_server(args)
        elif args.command == "model-server":
            _model_server(args)
        elif args.command == "report":
            from .rebuild import report

            where = report(args.folders, out=args.out)
            page = "comparison.html" if (where / "comparison.html").is_file() else "report.html"
            print(f"report written to {where}/{page}")
        elif args.command == "advise":
            _advise(args)
        elif args.command == "examples":
            _examples(args)
        elif args.command == "safety-eval":
            import json

            from .safety_eval_cli import evaluate_target

            print(json.dumps(evaluate_target(args.target, advbench=args.advbench, examples=args.examples,
                                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                             device=args.device), indent=2))
        return 0
    except (ValueError, FileNotFoundError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
