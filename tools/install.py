"""The install step of the README's commands (`make test`, `make train`, ...): gets the active
Python environment ready, and when it already is, says so within a second.

    python tools/install.py [--extras test,train] [--optional-extras bench]

1. torch: any installed torch >= 2.4 is used as it is; without one, pip fetches "torch>=2.4".
2. The build tools (pyproject.toml's [build-system] requires), pyengine's dependencies and the
   named extras: only the missing ones are installed. The optional extras' missing packages are
   installed too, but a failure there is reported and the step goes on (the benchmarks' JAX
   contender, say, is left out, not the benchmarks).
3. pyengine, built in place (pip install --no-build-isolation --no-deps -e .), only when this
   environment has no editable install of this folder, or the sources, the build settings or
   torch changed since the last build (a fingerprint in build/). setup.py keeps the compiled
   objects in build/, so a rebuild recompiles only what changed.

Standard library only: it runs before anything else is installed.
"""
import argparse
import ast
import glob
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_FILE = os.path.join(ROOT, "build", "install-state.json")
NOTICE_FILE = os.path.join(ROOT, "build", "notice.txt")  # written by setup.py
# Inputs of the compiled library besides the sources: a change in any of them needs a rebuild.
BUILD_ENV = ("PYENGINE_CUDA", "PYENGINE_DEBUG", "PYENGINE_SANITIZE", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX", "CC")


def say(message: str) -> None:
    print(f"[install] {message}", flush=True)


# ---- requirements ---------------------------------------------------------------------------

def pyproject_requirements(extras):
    """(build requirements, runtime dependencies + the extras' packages) from pyproject.toml,
    read with a minimal parser: each list is one `name = [...]` line there (tomllib is 3.11+)."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    section = None
    lists = {}
    for line in text.splitlines():
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            section = header.group(1)
            continue
        entry = re.match(r"^([\w-]+)\s*=\s*(\[.*\])\s*$", line)
        if entry and section:
            try:
                lists[(section, entry.group(1))] = ast.literal_eval(entry.group(2))
            except (ValueError, SyntaxError):  # an inline table, e.g. authors: not needed here
                pass
    build = lists[("build-system", "requires")]
    runtime = list(lists[("project", "dependencies")])
    for extra in extras:
        key = ("project.optional-dependencies", extra)
        if key not in lists:
            raise SystemExit(f"tools/install.py: pyproject.toml has no extra named {extra!r}")
        runtime += lists[key]
    return build, runtime


def _version_tuple(version: str):
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def missing(requirements):
    """The requirements not satisfied here. Understands `name` and `name>=X.Y`, the only forms
    pyproject.toml uses (anything else counts as satisfied when the package is installed)."""
    out = []
    for req in dict.fromkeys(requirements):
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([\d.]+))?\s*$", req)
        name, minimum = (m.group(1), m.group(2)) if m else (re.split(r"[<>=!~ ;\[]", req)[0], None)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(req)
            continue
        if minimum and _version_tuple(installed) < _version_tuple(minimum):
            out.append(req)
    return out


def pip_install(args, required=True):
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    say(" ".join(["pip install -q", *args]))
    if subprocess.run(cmd).returncode != 0:
        if required:
            raise SystemExit(f"tools/install.py: `{' '.join(cmd)}` failed (see pip's message "
                             "above)")
        say(f"`{' '.join(cmd)}` failed (see pip's message above): an optional extra, so going "
            "on without it")


# ---- the build's fingerprint ----------------------------------------------------------------

def fingerprint() -> str:
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True))
    files += [os.path.join(ROOT, "setup.py"), os.path.join(ROOT, "pyproject.toml")]
    for path in files:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, ROOT).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    digest.update(f"python {sys.version_info[:2]} torch {metadata.version('torch')}".encode())
    for name in BUILD_ENV:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return digest.hexdigest()


def built_library():
    found = glob.glob(os.path.join(ROOT, "pyengine", "_C*.so")) + \
        glob.glob(os.path.join(ROOT, "pyengine", "_C*.pyd"))
    return found[0] if len(found) == 1 else None


def installed_here() -> bool:
    """This environment has pyengine installed in editable mode from this folder."""
    try:
        dist = metadata.distribution("pyengine")
    except metadata.PackageNotFoundError:
        return False
    direct_url = dist.read_text("direct_url.json")
    if not direct_url:
        return False
    info = json.loads(direct_url)
    url = info.get("url", "")
    return info.get("dir_info", {}).get("editable", False) and \
        os.path.realpath(url.removeprefix("file://")) == os.path.realpath(ROOT)


def up_to_date(print_: str) -> bool:
    library = built_library()
    if not (library and installed_here() and os.path.exists(STATE_FILE)):
        return False
    with open(STATE_FILE) as f:
        state = json.load(f)
    return (state.get("fingerprint") == print_ and state.get("library") == library
            and state.get("library_mtime") == os.path.getmtime(library))


def build(print_: str) -> None:
    say("building pyengine in place (pip install --no-build-isolation --no-deps -e .); "
        "unchanged files are not recompiled")
    start = time.perf_counter()
    pip_install(["--no-build-isolation", "--no-deps", "-e", ROOT])
    library = built_library()
    if library is None:
        raise SystemExit("tools/install.py: the build finished but left no pyengine/_C library")
    os.makedirs(os.path.dirname(STATE_FILE), exist_ok=True)
    with open(STATE_FILE, "w") as f:
        json.dump({"fingerprint": print_, "library": library,
                   "library_mtime": os.path.getmtime(library)}, f)
    say(f"built in {time.perf_counter() - start:.0f} s")
    if os.path.exists(NOTICE_FILE):
        for line in open(NOTICE_FILE):
            say(line.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", default="test,train",
                        help="pyproject.toml extras to make sure of (default test,train)")
    parser.add_argument("--optional-extras", default="",
                        help="pyproject.toml extras to try to install: a failure is reported, "
                        "not fatal (e.g. bench)")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    optional_extras = [e for e in args.optional_extras.split(",") if e]

    build_reqs, runtime_reqs = pyproject_requirements(extras)
    optional_reqs = pyproject_requirements(optional_extras)[1] if optional_extras else []
    torch_req = next(r for r in runtime_reqs if re.match(r"torch\b", r))
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    if torch_version is None:
        say(f"no torch installed: fetching {torch_req}")
        pip_install([torch_req])
    elif missing([torch_req]):
        raise SystemExit(f"tools/install.py: pyengine needs {torch_req}, but torch "
                         f"{torch_version} is installed; upgrade it (pip install -U torch) "
                         "or use another environment")
    others = [r for r in missing(build_reqs + runtime_reqs) if not re.match(r"torch\b", r)]
    if others:
        pip_install(others)
    optional = [r for r in missing(optional_reqs) if r not in runtime_reqs]
    if optional:
        pip_install(optional, required=False)

    print_ = fingerprint()
    if up_to_date(print_):
        say(f"pyengine is built and installed, up to date ({os.path.basename(built_library())})")
        return 0
    build(print_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
