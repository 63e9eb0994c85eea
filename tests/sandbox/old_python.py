"""The oldest Python 3 this machine has, made runnable by the sandbox's ssh user.

Destination head-nodes still run CentOS 7 or Ubuntu 18.04, whose ``python3`` is 3.6; the
remote helper must work there. Where pyenv has built a 3.6 (as on this project's machines),
that is the one; it lives under root's home, which the ssh user cannot enter, so its
interpreter and standard library are copied into that user's home, with a ``python3`` wrapper
script that points the copy at its own shared library. Without any such build, the oldest
``python3.X`` on PATH is used as it is.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

from .ssh_server import SshServer

_NAME = re.compile(r"python3\.(\d+)$")
_SKIP = ("test", "site-packages", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip")


def _minor(path: str) -> int | None:
    match = _NAME.search(path)
    return int(match.group(1)) if match else None


def oldest_python() -> Path:
    """The oldest CPython 3.6+ found (pyenv builds first, then PATH)."""
    roots = {os.environ.get("PYENV_ROOT") or "", "/root/.pyenv", str(Path.home() / ".pyenv")}
    found = [p for root in roots if root for p in glob.glob(f"{root}/versions/3.*/bin/python3.*")]
    usable = [(m, 0, p) for p in found if (m := _minor(p)) is not None and m >= 6]
    for minor in range(6, 20):
        on_path = shutil.which(f"python3.{minor}")
        if on_path and "/shims/" not in on_path:  # pyenv's shims are scripts, not Pythons
            usable.append((minor, 1, on_path))
    if not usable:
        raise RuntimeError("no python3.6 or newer found")
    return Path(min(usable)[2])


def python_for_user(ssh: SshServer) -> tuple[str, str]:
    """A ``python3`` for the ssh user (a path there) and its version, e.g. ``3.6.15``.

    The copy is made once and kept in the user's home for later sessions.
    """
    python = oldest_python()
    minor = _minor(str(python))
    prefix = python.resolve().parent.parent
    target = ssh.home / f".migratio-test-python3.{minor}-v2"
    wrapper = target / "python3"
    if not wrapper.exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "bin").mkdir(parents=True)
        shutil.copy2(python, tmp / "bin" / python.name)
        (tmp / "lib").mkdir()
        for lib in (prefix / "lib").glob("libpython3*.so*"):
            shutil.copy2(lib, tmp / "lib" / lib.name)
        stdlib = prefix / "lib" / f"python3.{minor}"
        shutil.copytree(stdlib, tmp / "lib" / stdlib.name, ignore=shutil.ignore_patterns(*_SKIP))
        (tmp / "python3").write_text(
            "#!/bin/sh\n"
            # no PYTHONHOME: it would reach the helper's glance CLI, another Python; this
            # one finds its standard library from where its binary is
            f'LD_LIBRARY_PATH="{target}/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
            f'exec "{target}/bin/{python.name}" "$@"\n'
        )
        (tmp / "python3").chmod(0o755)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
        tmp.rename(target)
    version = ssh.run_as_user([str(wrapper), "-c", "import sys; print(sys.version.split()[0])"])
    if version.returncode != 0:
        raise RuntimeError(f"{wrapper} does not run: {version.stderr}")
    return str(wrapper), version.stdout.strip()
