"""Helpers shared by the test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.sandbox.site import Sandbox

from migratio.config import Settings, load_settings


def settings_for(
    sandbox: Sandbox, tmp_path: Path, *, yaml: str = "", **extra_sites: str
) -> Settings:
    """The sandbox's settings with private staging/log dirs, extra YAML and extra site files."""
    sites = tmp_path / "sites"
    sites.mkdir(exist_ok=True)
    for conf in sandbox.sites_dir.glob("*.conf"):
        shutil.copy(conf, sites / conf.name)
    for name, text in extra_sites.items():
        (sites / f"{name}.conf").write_text(text)
    config = tmp_path / "config.yml"
    config.write_text(
        sandbox.config_path.read_text()
        + f"\nsites_dir: {sites}\nstaging_dir: {tmp_path / 'staging'}\n"
        + f"log_dir: {tmp_path / 'log'}\n"
        + yaml
    )
    return load_settings(config)


class Lines(list[str]):
    """A status sink that keeps the lines."""

    def __call__(self, text: str) -> None:
        self.append(text)


def no_work_left(staging_dir: Path) -> bool:
    """Nothing in staging but complete cache entries (no work dir, no half-made entry).

    Dot files (the link history of :mod:`migratio.compression`) do not count.
    """
    others = [p.name for p in staging_dir.iterdir() if p.name != "cache" and p.name[0] != "."]
    partial = list((staging_dir / "cache").glob("*.partial"))
    return others == [] and partial == []
