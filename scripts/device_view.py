"""A Python that sees only some of this interpreter's packages: the CPU rehearsal of a machine that has fewer.

    .venv/bin/python scripts/device_view.py --out DIR --only scripts/device_packages.txt --wheels .whl   # the GPU
    .venv/bin/python scripts/device_view.py --out DIR --without ray,datasets                # all but these

Makes DIR/venv, a virtual environment with no packages of its own, and DIR/lib, links to the top-level modules and
the metadata of each kept distribution of this interpreter's site-packages. Run DIR/venv/bin/python with
PYTHONPATH=...:DIR/lib: a distribution left out is not there at all, as on that machine (``import`` fails,
``importlib.util.find_spec`` is None, no metadata), for every child process that runs ``sys.executable`` too. Only
the standard library, with no third-party import. The project itself is not linked: put the checkout on PYTHONPATH.

With --only, a listed distribution brings what it requires here (the machine's versions of them come with their own
requirements met), except the distributions of --wheels DIR's wheels: those come from the wheels alone (installed
with `pip install --target` and put first on PYTHONPATH), so that a wheel the set lacks shows as a failed import.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import site
import sys
import venv
from pathlib import Path


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> set[str]:
    return {norm(ln.split("#")[0].strip()) for ln in path.read_text().splitlines() if ln.split("#")[0].strip()}


def top_level(dist: md.Distribution, root: Path) -> set[str]:
    """The entries of ``root`` (site-packages) that ``dist`` installed: packages, modules, its .dist-info."""
    entries = set()
    for f in dist.files or ():
        parts = Path(f).parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
            continue
        if (root / parts[0]).exists():
            entries.add(parts[0])
    return entries


def installed() -> dict[str, tuple[md.Distribution, Path]]:
    """This interpreter's distributions (but the project's own) by normalised name, with their site-packages dir."""
    out = {}
    for root in map(Path, site.getsitepackages()):
        for dist in md.distributions(path=[str(root)]):
            name = norm(dist.metadata["Name"] or "")
            if name and name != "openllm-ds":
                out.setdefault(name, (dist, root))
    return out


def requirements(dist: md.Distribution) -> set[str]:
    """The names ``dist`` requires, its extras' left out."""
    names = set()
    for req in dist.requires or ():
        if "extra" in req.partition(";")[2]:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if m:
            names.add(norm(m.group(1)))
    return names


def closure(names: set[str], have: dict, carried: set[str]) -> set[str]:
    """``names`` that are installed here and what they require here, transitively, but never the ``carried`` ones:
    the machine's own packages come with their own requirements met (its versions may need other ones than ours)."""
    todo, out = [n for n in names if n in have and n not in carried], set()
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += [r for r in requirements(have[name][0]) if r in have and r not in carried]
    return out


def wheel_names(folder: Path) -> set[str]:
    return {norm(w.name.split("-")[0]) for w in folder.glob("*.whl")}


def build(out: Path, names: set[str], have: dict) -> None:
    """DIR/venv and DIR/lib with the distributions ``names``."""
    lib = out / "lib"
    if out.exists():
        shutil.rmtree(out)
    lib.mkdir(parents=True)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(out / "venv")
    for name in sorted(names):
        dist, root = have[name]
        for entry in top_level(dist, root):
            if not (lib / entry).exists():
                (lib / entry).symlink_to(root / entry)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where venv/ and lib/ go (replaced)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--only", help="a file of distribution names, one a line (# comments)")
    group.add_argument("--without", help="comma-separated distribution names to leave out")
    p.add_argument("--wheels", help="with --only: a dir of wheels whose distributions the view leaves out")
    a = p.parse_args(argv)
    have = installed()
    if a.only:
        listed = read_names(Path(a.only))
        names = closure(listed, have, wheel_names(Path(a.wheels)) if a.wheels else set())
        extra = sorted(names - listed)
        note = f" ({len(extra)} of them required by the listed ones here: {', '.join(extra)})" if extra else ""
    else:
        left_out = {norm(n) for n in a.without.split(",") if n.strip()}
        names, note = set(have) - left_out, ""
    build(Path(a.out), names, have)
    print(f"{a.out}: {len(names)} distributions of {sys.prefix}{note} visible to {a.out}/venv/bin/python with "
          f"PYTHONPATH={a.out}/lib", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
