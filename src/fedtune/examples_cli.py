"""`fedtune examples`: the example configs that ship inside the package, listed and copied out.

They are package data (``fedtune/examples/*.yaml``; in a checkout, the repository's examples/), so a
``pip install fedtune`` user has them without the repository. Each starts with the command that runs it.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path


def folder() -> Path:
    """Where the installed example configs are."""
    return Path(str(resources.files("fedtune").joinpath("examples")))


def available() -> dict[str, Path]:
    """Example name (file name without .yaml) -> its file."""
    return {p.stem: p for p in sorted(folder().glob("*.yaml"))}


def describe(path: Path) -> str:
    """The example's leading comment: its command first, then what it does."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return "\n".join(lines)


def listing() -> str:
    out = []
    for name, path in available().items():
        doc = describe(path).splitlines()
        out.append(f"{name}\n" + "\n".join(f"    {d}" for d in doc))
    out.append("\nCopy them out with: fedtune examples --copy-to DIR [NAME ...]")
    return "\n".join(out)


def copy(names: list[str], to: str | Path, force: bool = False) -> list[Path]:
    """Copy the named examples (all when `names` is empty) into folder `to`; returns the files written.

    An existing file is left alone (ValueError naming it) unless `force`.
    """
    known = available()
    unknown = [n for n in names if n.removesuffix(".yaml") not in known]
    if unknown:
        raise ValueError(f"fedtune examples: no example named {', '.join(map(repr, unknown))}; "
                         f"there are {', '.join(known)} (fedtune examples lists them).")
    chosen = [n.removesuffix(".yaml") for n in names] or list(known)
    target = Path(to)
    if target.exists() and not target.is_dir():
        raise ValueError(f"--copy-to {str(target)!r} is a file; give a folder (it is created when missing).")
    clash = [target / f"{n}.yaml" for n in chosen if (target / f"{n}.yaml").exists()]
    if clash and not force:
        raise ValueError(f"{', '.join(map(str, clash))} already exist(s); pass --force to overwrite.")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for n in chosen:
        shutil.copyfile(known[n], target / f"{n}.yaml")
        written.append(target / f"{n}.yaml")
    return written
