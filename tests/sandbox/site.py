"""A two-site migratio setup: source Glance here, destination Glance and sshd on a second host.

The destination host is a network namespace reached over a veth pair (``network.py``) when
this machine can make one (root, ``ip``, ``tc``, ``ethtool``, ``gcc``); its link can then be
shaped with :meth:`Sandbox.shape`.  Otherwise — or with ``MIGRATIO_SANDBOX_NETWORK=loopback``
— everything listens on 127.0.0.1 as before.  Under ``CI=true`` a missing second host is an
error, not a silent fallback.

Layout under ``workdir``::

    site-a/            source Glance (state, file store in site-a/images, api.log)
    site-b/            destination Glance
    ssh/               sshd config, host key, client key, known_hosts
    migratio/
        config.yml     migratio's config for site-a
        creds          source credentials (OS_AUTH_TOKEN, OS_IMAGE_URL, IMAGES_DIR, SOURCE_CS)
        config/site-b.conf      how to reach site-b over ssh
        config/site-b-api.conf  site-b registered through its Glance API instead
        staging/ log/

The ssh user's ``~/.creds`` sets OS_AUTH_TOKEN, OS_IMAGE_URL (destination) and
PATH (Glance venv) so ``. ~/.creds; glance ...`` works remotely.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from ._process import Service
from .glance_server import TOKEN, GlanceServer, glance_venv
from .network import TwoHostNetwork, network_missing
from .ssh_server import SshServer

SOURCE_SITE = "site-a"
DESTINATION_SITE = "site-b"
REDIS_URL = "redis://127.0.0.1:6379"
NAMESPACE = "atmosphere"
REMOTE_STAGING = ".migratio-staging"  # relative to the ssh user's home
_CREDS_MARKER = "# written by the migratio test sandbox"


class Sandbox(Service):
    """Source + destination Glance and an sshd "destination host", with migratio's config."""

    def __init__(self, workdir: Path, *, two_hosts: bool | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        if two_hosts is None:
            two_hosts = _two_hosts_wanted()
        #: the destination host's namespace and link, or None when all is on loopback
        self.network = TwoHostNetwork(self.workdir / "network") if two_hosts else None
        self.source = GlanceServer(self.workdir, SOURCE_SITE)
        self.destination = GlanceServer(self.workdir, DESTINATION_SITE)
        self.ssh = SshServer(self.workdir / "ssh")
        self.migratio_dir = self.workdir / "migratio"
        self.config_path = self.migratio_dir / "config.yml"
        self.creds_path = self.migratio_dir / "creds"
        self.sites_dir = self.migratio_dir / "config"
        self.site_conf = self.sites_dir / f"{DESTINATION_SITE}.conf"
        self.site_api_conf = self.sites_dir / f"{DESTINATION_SITE}-api.conf"
        self.staging_dir = self.migratio_dir / "staging"
        self.log_dir = self.migratio_dir / "log"
        self.source_site = SOURCE_SITE
        self.destination_site = DESTINATION_SITE

    @property
    def remote_staging(self) -> Path:
        """The ssh user's ``~/.migratio-staging`` (valid after start)."""
        return self.ssh.home / REMOTE_STAGING

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Sandbox:
        """Start both Glance servers (in parallel) and sshd, then write all config files."""
        try:
            if self.network is not None:
                self.network.start()
                prefix = self.network.exec_argv([])
                self.destination.place(self.network.address, prefix)
                self.ssh.place(self.network.address, prefix)
                # the second host's workers reach the source Glance over the veth
                self.source.also_listen(self.network.host_address)
            errors: list[BaseException] = []

            def start_glance(server: GlanceServer) -> None:
                try:
                    server.start()
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                threading.Thread(target=start_glance, args=(g,), name=f"start-{g.name}")
                for g in (self.source, self.destination)
            ]
            for t in threads:
                t.start()
            try:
                self.ssh.start()
            finally:  # never stop() while a Glance is still half-started
                for t in threads:
                    t.join()
            if errors:
                raise errors[0]
            self._write_files()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop sshd and both Glance servers (uWSGI takes ~1 s each, so in parallel)."""
        threads = [
            threading.Thread(target=server.stop, name=f"stop-{server.name}")
            for server in (self.source, self.destination)
        ]
        for t in threads:
            t.start()
        self.ssh.stop()
        for t in threads:
            t.join()
        if self.network is not None:
            self.network.stop()

    def shape(self, rate_mbit: float | None = None, rtt_ms: float = 0.0) -> None:
        """Shape the link to the destination host (see ``TwoHostNetwork.shape``)."""
        if self.network is None:
            raise RuntimeError("this sandbox runs on loopback: there is no link to shape")
        self.network.shape(rate_mbit, rtt_ms)

    def reset(self) -> None:
        """Delete all images on both Glance servers; empty local and remote staging."""
        self.source.delete_all()
        self.destination.delete_all()
        self.ssh.remove_home_path(REMOTE_STAGING)
        if self.staging_dir.exists():
            shutil.rmtree(self.staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    # -- files ---------------------------------------------------------------------

    def _write_files(self) -> None:
        for d in (self.migratio_dir, self.sites_dir, self.staging_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"name: {SOURCE_SITE}\n"
            f"redis_url: {REDIS_URL}\n"
            f"namespace: {NAMESPACE}\n"
            f"credentials_file: {self.creds_path}\n"
            f"sites_dir: {self.sites_dir}\n"
            f"staging_dir: {self.staging_dir}\n"
            f"log_dir: {self.log_dir}\n"
        )
        _write_private(
            self.creds_path,
            f"export OS_AUTH_TOKEN={TOKEN}\n"
            f"export OS_IMAGE_URL={self.source.endpoint}\n"
            f"export IMAGES_DIR={self.source.images_dir}\n"
            f"export SOURCE_CS={SOURCE_SITE}\n",
        )
        _write_private(
            self.site_conf,
            f"export EXTERNAL_USER={self.ssh.user}\n"
            f"export EXTERNAL_HOST={self.ssh.address}\n"
            f"export SSH_PORT={self.ssh.port}\n"
            f"export SSH_KEY={self.ssh.client_key}\n"
            f"export SSH_KNOWN_HOSTS={self.ssh.known_hosts}\n",
        )
        _write_private(self.site_api_conf, api_site_conf(self.destination.endpoint))
        remote_creds = self.ssh.home / ".creds"
        if (
            not self.ssh.is_root
            and remote_creds.exists()
            and _CREDS_MARKER not in remote_creds.read_text(errors="replace")
        ):
            raise RuntimeError(f"refusing to overwrite your own {remote_creds}")
        self.ssh.write_home_file(
            ".creds",
            f"{_CREDS_MARKER}\n"
            f"export OS_AUTH_TOKEN={TOKEN}\n"
            f"export OS_IMAGE_URL={self.destination.endpoint}\n"
            f"export PATH={glance_venv()}/bin:$PATH\n",
        )


def api_site_conf(image_url: str, *exports: str) -> str:
    """A site file for a destination reached through the Glance API at ``image_url`` (a sandbox
    Glance's token), with ``exports`` (``"KEY=value"``) after ``REGISTER=api``."""
    lines = ["REGISTER=api", *exports, f"OS_AUTH_TOKEN={TOKEN}", f"OS_IMAGE_URL={image_url}"]
    return "".join(f"export {line}\n" for line in lines)


def _two_hosts_wanted() -> bool:
    if os.environ.get("MIGRATIO_SANDBOX_NETWORK") == "loopback":
        return False
    missing = network_missing()
    if missing and os.environ.get("CI") == "true":
        raise RuntimeError(f"CI=true but the sandbox cannot make its second host: {missing}")
    return missing is None


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)
