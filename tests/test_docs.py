"""The documentation: links resolve, the README stays short, its tour runs, the config reference is current,
and the mkdocs site builds strictly."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

import fedtune
from conftest import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300
TOUR_HEADING = "## A 5-minute tour"

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code removed."""
    out, fence = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fence = not fence
            continue
        if not fence:
            out.append((i, re.sub(r"`[^`]*`", "", line)))
    return out


def _heading_text(line: str) -> str:
    text = line.lstrip("#").strip()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    return text.replace("`", "").replace("*", "")


def slug_mkdocs(text: str) -> str:
    """Python-Markdown's toc slugify (mkdocs' default)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def slug_github(text: str) -> str:
    """GitHub's heading anchors: lowercase, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors that both mkdocs and GitHub give the file's headings (a link must work in both)."""
    out = set()
    for _, line in _headings(path.read_text()):
        text = _heading_text(line)
        if slug_mkdocs(text) == slug_github(text):
            out.add(slug_mkdocs(text))
    return out


def _headings(text: str) -> list[tuple[int, str]]:
    out, fence = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fence = not fence
        elif not fence and re.match(r"^#{1,6} ", line):
            out.append((i, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    return [(i, m.group(1)) for i, line in _prose_lines(path.read_text()) for m in _LINK.finditer(line)]


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        for line, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            where = f"{page.relative_to(REPO)}:{line}: {target}"
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{where}: no such file")
                continue
            if page.parent == DOCS and DOCS.resolve() not in dest.resolve().parents and dest != page:
                bad.append(f"{where}: the site cannot link outside docs/; name the repository file as `code`")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_link_checker_sees_links_and_anchors():
    assert slug_mkdocs("Split learning over Flower (with the split service)") == \
        "split-learning-over-flower-with-the-split-service"
    assert slug_github(_heading_text("## Several GPUs: `runtime.world_size`")) == "several-gpus-runtimeworld_size"
    found = {t for _, t in links(README)}
    assert "docs/index.md" in found and "docs/models-and-data.md#models" in found


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (move detail into docs/)"


def tour_commands() -> list[str]:
    """The shell lines of the ```bash blocks under the README's tour heading (comments dropped)."""
    text = README.read_text()
    assert TOUR_HEADING in text, f"README.md has no {TOUR_HEADING!r} section"
    section = text.split(TOUR_HEADING, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S):
        pending = ""
        for line in block.splitlines():
            line = pending + line.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


_SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?]")


def _tour_env() -> dict[str, str]:
    src = str(Path(fedtune.__file__).resolve().parents[1])
    env = dict(os.environ, FEDTUNE_PY=sys.executable, PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# `fedtune` and `python` are the project's own interpreter, as in the activated .venv.
_PRELUDE = 'set -eo pipefail\nfedtune() { "$FEDTUNE_PY" -m fedtune.cli "$@"; }\npython() { "$FEDTUNE_PY" "$@"; }\n'


def _shell(command: str, cwd: Path) -> None:
    proc = subprocess.run(["bash", "-c", _PRELUDE + command], cwd=cwd, env=_tour_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README tour command failed: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _tour_folder(tmp_path: Path) -> Path:
    (tmp_path / "examples").symlink_to(REPO / "examples")
    return tmp_path


def _check_tour_outputs(cwd: Path) -> None:
    assert (cwd / "runs" / "quick" / "summary.json").is_file()
    assert (cwd / "runs" / "cmp" / "comparison.md").is_file()


def test_the_tour_runs(tmp_path, monkeypatch):
    """Every tour command, from a fresh folder. `fedtune ...` lines run through `fedtune.cli.main`, the
    function the `fedtune` script calls, in this process (one import of torch instead of one per command:
    ~40 s instead of ~85 s on 2 busy cores); other lines run in bash. test_the_tour_runs_as_a_user_types_it
    runs them all as subprocesses."""
    from fedtune.cli import main

    commands = tour_commands()
    assert any(c.startswith("fedtune run ") for c in commands) and any(c.startswith("fedtune compare ") for c in commands)
    cwd = _tour_folder(tmp_path)
    monkeypatch.chdir(cwd)
    for command in commands:
        if command.startswith("fedtune ") and not _SHELL_SYNTAX.search(command):
            try:
                rc = main(shlex.split(command)[1:])
            except SystemExit as stop:  # --help
                rc = stop.code
            assert rc in (0, None), f"README tour command failed with exit status {rc}: {command}"
        else:
            _shell(command, cwd)
    _check_tour_outputs(cwd)


@pytest.mark.slow
def test_the_tour_runs_as_a_user_types_it(tmp_path):
    """The same commands, each its own process, `fedtune` being `python -m fedtune.cli`."""
    cwd = _tour_folder(tmp_path)
    for command in tour_commands():
        _shell(command, cwd)
    _check_tour_outputs(cwd)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_is_up_to_date():
    committed = (DOCS / "configuration-reference.md").read_text()
    assert committed == _generator().render(), (
        "docs/configuration-reference.md differs from what docs/gen_config_reference.py generates from the "
        "config dataclasses: run `make docs` (or `python docs/gen_config_reference.py`) and commit the result."
    )


def test_the_config_reference_lists_every_key():
    import dataclasses
    import typing

    from fedtune import config as cfg

    page = (DOCS / "configuration-reference.md").read_text()
    hints = typing.get_type_hints(cfg.Config)
    for top in dataclasses.fields(cfg.Config):
        tp = hints[top.name]
        keys = [f"{top.name}.{f.name}" for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else [top.name]
        for key in keys:
            assert f"| `{key}` |" in page, f"{key} is missing from docs/configuration-reference.md"


def test_the_generator_finds_sections_wherever_they_are_defined(tmp_path):
    """A section moved into a paradigm module is still found, named by Config's annotation or its class name."""
    (tmp_path / "paradigms").mkdir()
    (tmp_path / "config.py").write_text(
        "from dataclasses import dataclass, field\n"
        "from .paradigms.kd import KDConfig\n"
        "@dataclass\nclass ModelConfig:\n    name: str = 'x'\n    \"\"\"The model.\"\"\"\n"
        "@dataclass\nclass Config:\n    seed: int = 0\n    model: ModelConfig = field(default_factory=ModelConfig)\n"
        "    distill: KDConfig = field(default_factory=KDConfig)\n"
    )
    (tmp_path / "paradigms" / "kd.py").write_text(
        "import dataclasses\n"
        "@dataclasses.dataclass(frozen=True)\nclass KDConfig:\n    top_k: int | None = 8\n    \"\"\"Top | k.\"\"\"\n"
        "@dataclasses.dataclass\nclass FooBarConfig:\n    lr: float = 3e-4\n    tags: list[str] = dataclasses.field(default_factory=lambda: ['a'])\n"
        "@dataclasses.dataclass\nclass Helper:\n    x: int = 1\n"
    )
    page = _generator().render(tmp_path)
    assert "| `seed` | int | `0` |" in page
    assert "| `model.name` | str | `x` | The model. |" in page
    assert "| `distill.top_k` | int or null | `8` | Top \\| k. |" in page
    assert "`KDConfig` in `fedtune.paradigms.kd`" in page
    assert "| `foobar.lr` | float | `3e-4` |" in page and "| `foobar.tags` | list of str | `[a]` |" in page
    assert "helper" not in page.lower()


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[docs]', or make env)")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARNING" not in output, output[-4000:]
    assert (tmp_path / "site" / "configuration-reference" / "index.html").is_file()


def _help_keys() -> dict[str, str]:
    """``fedtune run --help``'s config keys: dotted key -> its description."""
    import contextlib
    import io

    from fedtune.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["run", "--help"])
    text = buf.getvalue().split("config keys (YAML sections, or --set section.key=value):\n", 1)[1]
    out, section = {}, ""
    for line in text.splitlines():
        if re.match(r"^  \S.*:$", line):
            section = line.strip()[:-1] + "."
        elif m := re.match(r"^ {2,4}(\w+) = (.*)$", line):
            key = (section if line.startswith("    ") else "") + m.group(1)
            default_and_doc = m.group(2)
            # `default  doc`: the doc follows two spaces after the default's repr (none when undocumented)
            out[key] = default_and_doc.split("  ", 1)[1] if "  " in default_and_doc else ""
    return out


def test_the_config_reference_says_what_help_says():
    """Every key `fedtune run --help` lists is in the reference with the same description, and no other:
    both come from the field docstrings, so a section registered under a name the generator does not derive
    (or a docstring one of them reads differently) fails here."""
    page = (DOCS / "configuration-reference.md").read_text()
    rows = {}
    for line in page.splitlines():
        if m := re.match(r"^\| `([\w.]+)` \| .* \| `.*` \| (.*) \|$", line):
            rows[m.group(1)] = m.group(2).replace("\\|", "|")
    helps = _help_keys()
    assert helps, "no config keys found in fedtune run --help"
    assert sorted(helps) == sorted(rows), (
        f"only in --help: {sorted(set(helps) - set(rows))}; only in the reference: {sorted(set(rows) - set(helps))}")
    differ = [f"{k}: --help {helps[k]!r} vs reference {rows[k]!r}" for k in helps if helps[k] != rows[k]]
    assert not differ, "\n".join(differ)
