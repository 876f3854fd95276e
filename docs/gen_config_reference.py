"""Write docs/configuration-reference.md from the config dataclasses' field docstrings.

    python docs/gen_config_reference.py            # (re)write the page
    python docs/gen_config_reference.py --check    # exit 1 if the committed page is out of date

The schema is read with `ast` from the source under src/fedtune, so nothing is imported (no torch):

* every dataclass whose name ends in ``Config``, in any module under src/fedtune, is a section;
* the root ``Config`` dataclass names the sections: a field ``kd: KDConfig`` makes ``KDConfig`` the
  section ``kd``; a ``Config`` dataclass that ``Config`` does not mention is named by its class name,
  lowercased, minus ``Config``; ``Config``'s own plain fields (``name``, ``seed``) are the top level;
* a field's description is the string literal right under it (the same text `fedtune run --help` shows).

Sections come in the order of ``Config``'s fields, then any others by module and line.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "fedtune"
OUT = ROOT / "docs" / "configuration-reference.md"


@dataclass
class Field:
    name: str
    type: str
    default: str
    doc: str


@dataclass
class Section:
    cls: str
    module: str  # e.g. fedtune.config
    line: int
    fields: list[Field]
    doc: str
    annotations: dict[str, str]  # field name -> annotation source (to map the root's sections)


def _is_dataclass(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def _type(node: ast.expr | None) -> str:
    """An annotation as a reader writes it in YAML terms: `"a"`, `"b"` for Literals, `or null` for None."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        return _type(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.Constant) and node.value is None:
        return "null"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_type(node.left)} or {_type(node.right)}"
    if isinstance(node, ast.Subscript):
        base = ast.unparse(node.value).rsplit(".", 1)[-1]
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Literal":
            return ", ".join(f"`{ast.literal_eval(a)!s}`" for a in args)
        if base == "Optional":
            return f"{_type(args[0])} or null"
        if base == "Union":
            return " or ".join(_type(a) for a in args)
        if base in ("list", "List"):
            return f"list of {_type(args[0])}"
        if base in ("dict", "Dict"):
            return f"mapping {_type(args[0])} to {_type(args[1])}"
        return ast.unparse(node)
    return ast.unparse(node)


def _yaml(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(node: ast.expr | None, source: str) -> str:
    if node is None:
        return "(required)"
    if isinstance(node, ast.Call) and ast.unparse(node.func).rsplit(".", 1)[-1] == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return _default(kw.value, source)
            if kw.arg == "default_factory":
                f = kw.value
                if isinstance(f, ast.Lambda):
                    return _default(f.body, source)
                return f"{ast.unparse(f)}()"
        return "(required)"
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return ast.get_source_segment(source, node) or str(node.value)  # keep `3e-4` as written
    try:
        return _yaml(ast.literal_eval(node))
    except ValueError:
        return ast.unparse(node)


def _sections(src: Path = SRC) -> list[Section]:
    out = []
    for path in sorted(src.rglob("*.py")):
        source = path.read_text()
        module = ".".join(("fedtune",) + path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.ClassDef) and node.name.endswith("Config") and _is_dataclass(node)):
                continue
            fields, annotations = [], {}
            body = node.body
            for i, stmt in enumerate(body):
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                if "ClassVar" in ast.unparse(stmt.annotation):
                    continue
                nxt = body[i + 1] if i + 1 < len(body) else None
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    doc = " ".join(nxt.value.value.split())
                name = stmt.target.id
                annotations[name] = ast.unparse(stmt.annotation).strip("'\"")
                fields.append(Field(name, _type(stmt.annotation), _default(stmt.value, source), doc))
            out.append(Section(node.name, module, node.lineno, fields, " ".join((ast.get_docstring(node) or "").split()),
                               annotations))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(src: Path = SRC) -> str:
    sections = _sections(src)
    by_cls = {s.cls: s for s in sections}
    roots = [s for s in sections if s.cls == "Config"]
    root = roots[0] if roots else None
    named: list[tuple[str, Section]] = []
    top: list[Field] = []
    if root is not None:
        for f in root.fields:
            ann = root.annotations[f.name]
            if ann in by_cls and ann != "Config":
                named.append((f.name, by_cls[ann]))
            else:
                top.append(f)
    seen = {s.cls for _, s in named} | {"Config"}
    for s in sorted(sections, key=lambda s: (s.module, s.line)):
        if s.cls not in seen:
            named.append((s.cls.removesuffix("Config").lower(), s))
            seen.add(s.cls)

    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/gen_config_reference.py from the config dataclasses' field docstrings."
        " Do not edit by hand: run `make docs`. -->",
        "",
        "Every key a config file (or `--set section.key=value`) accepts, with its type, its default and what it"
        " does. `fedtune run --help` prints the same list. [Configuration](configuration.md) explains how a config"
        " is read and checked.",
        "",
        "Sections: " + ", ".join(f"[`{name}`](#{name})" for name, _ in named) + ".",
        "",
    ]
    header = ["| key | type | default | description |", "|---|---|---|---|"]

    def rows(prefix: str, fields: list[Field]) -> list[str]:
        return [
            f"| `{prefix}{f.name}` | {_cell(f.type)} | `{_cell(f.default)}` | {_cell(f.doc)} |" for f in fields
        ]

    if top:
        lines += ["## Top level", "", "Keys outside any section.", ""] + header + rows("", top) + [""]
    for name, s in named:
        lines += [f"## `{name}`", "", f"`{s.cls}` in `{s.module}`." + (f" {s.doc}" if s.doc else ""), ""]
        lines += header + rows(f"{name}.", s.fields) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if the committed page differs from the generated one")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run `make docs`.", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
