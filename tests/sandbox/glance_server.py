"""A real Glance API (v2, file store, no Keystone) served by uWSGI on 127.0.0.1.

:meth:`GlanceServer.also_listen` adds a second address on the same port: the sandbox's end of
its veth, so that the second host reaches the source Glance over the link (``network.py``).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._process import UwsgiDaemon, child_env, tail

DEFAULT_GLANCE_VENV = Path("/opt/migratio-sandbox/glance-venv")
TOKEN = "sandbox"  # Glance runs without Keystone: any token is accepted


def glance_venv() -> Path:
    """The venv holding Glance, uWSGI and the glance CLI ($MIGRATIO_GLANCE_VENV overrides)."""
    return Path(os.environ.get("MIGRATIO_GLANCE_VENV") or DEFAULT_GLANCE_VENV)


def glance_venv_missing() -> str | None:
    """Why the Glance venv is unusable, or None when uwsgi and glance are there."""
    venv = glance_venv()
    for tool in ("uwsgi", "glance", "glance-manage"):
        if not os.access(venv / "bin" / tool, os.X_OK):
            return f"{venv}/bin/{tool} is missing: run scripts/bootstrap"
    return None


@dataclass(frozen=True)
class KeystoneAuth:
    """What a Glance needs to check tokens with Keystone: its service user there."""

    auth_url: str
    username: str
    password: str
    project_name: str = "service"


class GlanceServerError(RuntimeError):
    """The Glance server did not come up."""


# Glance's API app, with every sqlite transaction taking the write lock when it begins.
# oslo.db begins them with a plain (deferred) BEGIN: two requests that both read, then both
# write (two uploads at once) deadlock in SQLite, which answers one at once with "database is
# locked", without waiting its busy timeout, and Glance with a 500. BEGIN IMMEDIATE makes the
# second one wait (the busy timeout of the [database] connection, 60 s) for the first to commit;
# WAL (set on the file after db_sync) keeps reads outside transactions going meanwhile.
_WSGI = """\
import sqlalchemy.event
from sqlalchemy.engine import Engine


@sqlalchemy.event.listens_for(Engine, "before_cursor_execute", retval=True)
def _begin_immediate(conn, cursor, statement, parameters, context, executemany):
    if statement == "BEGIN" and conn.dialect.name == "sqlite":
        statement = "BEGIN IMMEDIATE"
    return statement, parameters


from glance.wsgi.api import application  # noqa: E402
"""


class GlanceServer(UwsgiDaemon):
    """One Glance API server whose state lives in ``workdir/name``.

    ``start()`` writes the config, runs ``glance-manage db_sync`` and serves the
    API with uWSGI on a free port of 127.0.0.1; ``stop()`` terminates uWSGI.
    """

    KIND = "Glance"
    ERROR = GlanceServerError

    def __init__(self, workdir: Path, name: str, *, keystone: KeystoneAuth | None = None) -> None:
        super().__init__()
        self.name = name
        #: with Keystone, tokens are checked and images get their project as owner; the
        #: token-less helpers below (client, upload_image...) then do not work
        self.keystone = keystone
        self.dir = Path(workdir).resolve() / name
        self.etc_dir = self.dir / "etc"
        self.images_dir = self.dir / "images"
        self.log_path = self.dir / "api.log"
        self.uwsgi_log_path = self.dir / "uwsgi.log"
        self.db_path = self.dir / "glance.sqlite"
        self.venv = glance_venv()
        #: a second address uWSGI listens on (same port), or None: see :meth:`also_listen`
        self.also_on: str | None = None

    def also_listen(self, address: str) -> None:
        """Listen on ``address`` too (before :meth:`start`), besides where it is placed."""
        self.also_on = address

    def endpoint_at(self, address: str) -> str:
        """``http://ADDRESS:PORT``: the endpoint as seen by a host reaching it at ``address``."""
        return f"http://{address}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> GlanceServer:
        """Configure, migrate the DB and serve; raise GlanceServerError with log tails."""
        if self._proc is not None:
            return self
        missing = glance_venv_missing()
        if missing:
            raise GlanceServerError(missing)
        try:
            for sub in ("etc", "images", "staging", "tasks"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
            self.images_dir.chmod(0o755)
            self._write_config()
            self._db_sync()
            error = self._serve_on_a_free_port()
            if error:
                raise GlanceServerError(error)
            return self
        except BaseException:
            self.stop()
            raise

    def _env(self) -> dict[str, str]:
        return child_env(OS_GLANCE_CONFIG_DIR=str(self.etc_dir))

    def _write_config(self) -> None:
        d = self.dir
        paste_src = next(self.venv.glob("etc/glance/glance-api-paste.ini"), None)
        if paste_src is None:
            raise GlanceServerError(f"{self.venv}/etc/glance/glance-api-paste.ini not found")
        shutil.copyfile(paste_src, self.etc_dir / "glance-api-paste.ini")
        if self.keystone is None:
            policy, flavor, authtoken = '"context_is_admin": "@"\n', "", ""
        else:  # the defaults, but any member may make an image public, as some clouds allow
            policy, flavor = '"publicize_image": "role:member or role:admin"\n', "keystone"
            ks = self.keystone
            authtoken = f"""
[keystone_authtoken]
www_authenticate_uri = {ks.auth_url}
auth_url = {ks.auth_url}
auth_type = password
username = {ks.username}
password = {ks.password}
project_name = {ks.project_name}
user_domain_name = Default
project_domain_name = Default
"""
        (self.etc_dir / "policy.yaml").write_text(policy)
        (self.etc_dir / "glance-api.conf").write_text(
            authtoken
            + f"""[DEFAULT]
bind_host = {self.address}
log_file = {self.log_path}
enabled_import_methods = []
show_multiple_locations = false
image_size_cap = 1099511627776

[database]
connection = sqlite:///{self.db_path}?timeout=60

[paste_deploy]
flavor = {flavor}
config_file = {self.etc_dir}/glance-api-paste.ini

[glance_store]
stores = file
default_store = file
filesystem_store_datadir = {self.images_dir}

[oslo_policy]
policy_file = {self.etc_dir}/policy.yaml

[os_glance_staging_store]
filesystem_store_datadir = {d}/staging

[os_glance_tasks_store]
filesystem_store_datadir = {d}/tasks
"""
        )

    def _db_sync(self) -> None:
        if self.db_path.exists():
            return
        glance_manage = str(self.venv / "bin" / "glance-manage")
        self._manage([glance_manage, "--config-dir", str(self.etc_dir), "db_sync"],
                     "glance-manage db_sync")  # fmt: skip
        with contextlib.closing(sqlite3.connect(self.db_path)) as db:
            db.execute("PRAGMA journal_mode=WAL")

    def _wsgi_file(self) -> Path:
        """Glance's own WSGI entry point, behind :data:`_WSGI` (sqlite transactions serialised)."""
        found = sorted(self.venv.glob("lib/python3*/site-packages/glance/wsgi/api.py"))
        if not found:
            raise GlanceServerError(f"glance/wsgi/api.py not found under {self.venv}")
        wsgi = self.etc_dir / "sandbox_wsgi.py"
        wsgi.write_text(_WSGI)
        return wsgi

    def _serve(self) -> str:
        """Start uWSGI and wait for the API; return '' when ready, else an error text."""
        return self._serve_uwsgi(
            ["--wsgi-file", str(self._wsgi_file())],
            ["--http-chunked-input", "--http-auto-chunked", "--http-raw-body",
             "--chunked-input-limit", "134217728", "--chunked-input-timeout", "300",
             "--socket-timeout", "300"],
        )  # fmt: skip

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection(self.address, self.port, timeout=2)
        try:
            conn.request("GET", "/v2/images?limit=1", headers={"X-Auth-Token": TOKEN})
            # with Keystone, a 401 for the made-up token is the answer of a working Glance
            return conn.getresponse().status in ((200, 401) if self.keystone else (200,))
        except OSError:
            return False
        finally:
            conn.close()

    # -- client helpers ------------------------------------------------------------

    def client(self) -> Any:
        """A glanceclient v2 Client talking to this server with token auth."""
        from glanceclient import Client  # noqa: PLC0415 (only needed by tests)
        from keystoneauth1 import session, token_endpoint  # noqa: PLC0415

        sess = session.Session(auth=token_endpoint.Token(self.endpoint, TOKEN))
        return Client("2", session=sess)

    def upload_image(
        self,
        path: Path,
        *,
        name: str,
        disk_format: str,
        container_format: str = "bare",
        properties: dict[str, str] | None = None,
        min_disk: int = 0,
        min_ram: int = 0,
        timeout: float = 300.0,
    ) -> str:
        """Create an image, upload ``path`` into it, wait until active; return its id."""
        glance = self.client()
        image = glance.images.create(
            name=name,
            disk_format=disk_format,
            container_format=container_format,
            min_disk=min_disk,
            min_ram=min_ram,
            **(properties or {}),
        )
        path = Path(path)
        with path.open("rb") as data:
            glance.images.upload(image["id"], data, image_size=path.stat().st_size)
        deadline = time.monotonic() + timeout
        while True:
            status = glance.images.get(image["id"])["status"]
            if status == "active":
                return str(image["id"])
            if status in {"killed", "deleted"} or time.monotonic() > deadline:
                raise GlanceServerError(
                    f"image {image['id']} ended {status!r} on {self.name}:\n{tail(self.log_path)}"
                )
            time.sleep(0.1)

    def image(self, image_id: str) -> dict[str, Any]:
        """The image's metadata as a plain dict."""
        return dict(self.client().images.get(image_id))

    def images(self) -> list[dict[str, Any]]:
        """All images on this server, as plain dicts."""
        return [dict(i) for i in self.client().images.list()]

    def image_bytes(self, image_id: str) -> bytes:
        """Download the image's data."""
        return b"".join(self.client().images.data(image_id))

    def download_to(self, image_id: str, path: Path) -> Path:
        """Stream the image's data to ``path``."""
        path = Path(path)
        with path.open("wb") as out:
            for chunk in self.client().images.data(image_id):
                out.write(chunk)
        return path

    def find_by_property(self, key: str, value: str) -> list[dict[str, Any]]:
        """Images whose property ``key`` equals ``value``."""
        return [dict(i) for i in self.client().images.list(filters={key: value})]

    def delete_all(self) -> None:
        """Delete every image (unprotecting first)."""
        glance = self.client()
        for image in list(glance.images.list()):
            if image.get("protected"):
                glance.images.update(image["id"], protected=False)
            glance.images.delete(image["id"])
