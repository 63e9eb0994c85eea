"""A real Keystone (identity v3, sqlite, fernet tokens) served by uWSGI on 127.0.0.1."""

from __future__ import annotations

import grp
import http.client
import os
import pwd
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from ._process import UwsgiDaemon, child_env, tail
from .glance_server import glance_venv

DEFAULT_KEYSTONE_VENV = Path("/opt/migratio-sandbox/keystone-venv")
REGION = "RegionOne"
ADMIN_USER = "admin"
ADMIN_PROJECT = "admin"
DOMAIN = "Default"


def keystone_venv() -> Path:
    """The venv holding Keystone and uWSGI ($MIGRATIO_KEYSTONE_VENV overrides).

    scripts/bootstrap puts Keystone into the Glance venv when it fits there, else into
    its own venv; whichever has ``keystone-manage`` is used.
    """
    override = os.environ.get("MIGRATIO_KEYSTONE_VENV")
    if override:
        return Path(override)
    for venv in (glance_venv(), DEFAULT_KEYSTONE_VENV):
        if os.access(venv / "bin" / "keystone-manage", os.X_OK):
            return venv
    return glance_venv()


def keystone_venv_missing() -> str | None:
    """Why the Keystone venv is unusable, or None when uwsgi and keystone-manage are there."""
    venv = keystone_venv()
    for tool in ("uwsgi", "keystone-manage"):
        if not os.access(venv / "bin" / tool, os.X_OK):
            return f"{venv}/bin/{tool} is missing: run scripts/bootstrap"
    return None


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _group() -> str:
    return grp.getgrgid(os.getgid()).gr_name


class KeystoneServerError(RuntimeError):
    """The Keystone server did not come up, or refused an admin request."""


class KeystoneServer(UwsgiDaemon):
    """One Keystone whose state lives in ``workdir/name``.

    ``start()`` writes keystone.conf, runs ``keystone-manage`` db_sync, fernet_setup,
    credential_setup and bootstrap (user ``admin`` with role ``admin`` on project
    ``admin``, domain ``Default``, region ``RegionOne``, identity endpoints), then serves
    the API with uWSGI on a free port of 127.0.0.1; ``stop()`` terminates uWSGI.
    """

    KIND = "Keystone"
    ERROR = KeystoneServerError

    def __init__(self, workdir: Path, name: str = "keystone") -> None:
        super().__init__()
        self.name = name
        self.dir = Path(workdir).resolve() / name
        self.etc_dir = self.dir / "etc"
        self.config_path = self.etc_dir / "keystone.conf"
        self.fernet_dir = self.dir / "fernet-keys"
        self.credential_dir = self.dir / "credential-keys"
        self.log_path = self.dir / "keystone.log"
        self.uwsgi_log_path = self.dir / "uwsgi.log"
        self.db_path = self.dir / "keystone.sqlite"
        self.venv = keystone_venv()
        self.admin_password = f"admin-{secrets.token_hex(8)}"
        self._session: Any = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> KeystoneServer:
        """Configure, set up the DB and keys, bootstrap and serve; raise with log tails."""
        if self._proc is not None:
            return self
        missing = keystone_venv_missing()
        if missing:
            raise KeystoneServerError(missing)
        try:
            self.etc_dir.mkdir(parents=True, exist_ok=True)
            for keys in (self.fernet_dir, self.credential_dir):
                keys.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._write_config()
            owner = ("--keystone-user", _user(), "--keystone-group", _group())
            # independent, and each mostly Python start-up time: run them side by side
            with ThreadPoolExecutor(3, thread_name_prefix=f"setup-{self.name}") as pool:
                steps = [
                    pool.submit(self._keystone_manage, "db_sync"),
                    pool.submit(self._keystone_manage, "fernet_setup", *owner),
                    pool.submit(self._keystone_manage, "credential_setup", *owner),
                ]
            for step in steps:
                step.result()
            error = self._serve_on_a_free_port()
            if error:
                raise KeystoneServerError(error)
            return self
        except BaseException:
            self.stop()
            raise

    @property
    def auth_url(self) -> str:
        """The identity v3 URL."""
        return f"{self.endpoint}/v3"

    def stop(self) -> None:
        """Terminate uWSGI (master and workers)."""
        super().stop()
        self._session = None

    def _env(self) -> dict[str, str]:
        return child_env(OS_KEYSTONE_CONFIG_DIR=str(self.etc_dir))

    def _write_config(self) -> None:
        self.config_path.write_text(
            f"""[DEFAULT]
log_file = {self.log_path}
use_stderr = false

[database]
connection = sqlite:///{self.db_path}

[token]
provider = fernet

[fernet_tokens]
key_repository = {self.fernet_dir}

[fernet_receipts]
key_repository = {self.fernet_dir}

[credential]
key_repository = {self.credential_dir}

[identity]
# the minimum bcrypt cost: every token request checks a password
password_hash_rounds = 4

[cache]
enabled = false
"""
        )

    def _keystone_manage(self, *args: str) -> None:
        argv = [str(self.venv / "bin" / "keystone-manage"), "--config-file", str(self.config_path)]
        self._manage([*argv, *args], f"keystone-manage {args[0]}", cwd=self.dir)

    def _bootstrap(self) -> None:
        """Admin user/project/role, region and identity endpoints (idempotent, updates URLs)."""
        self._keystone_manage(
            "bootstrap",
            "--bootstrap-password", self.admin_password,
            "--bootstrap-username", ADMIN_USER,
            "--bootstrap-project-name", ADMIN_PROJECT,
            "--bootstrap-role-name", "admin",
            "--bootstrap-service-name", "keystone",
            "--bootstrap-region-id", REGION,
            "--bootstrap-admin-url", self.auth_url,
            "--bootstrap-internal-url", self.auth_url,
            "--bootstrap-public-url", self.auth_url,
        )  # fmt: skip

    def _serve(self) -> str:
        """Bootstrap for this port (the catalog's identity URLs name it), start uWSGI and
        wait for the API; return '' when ready, else an error text."""
        self._bootstrap()
        return self._serve_uwsgi(
            ["--module", "keystone.wsgi.api:application"], ["--socket-timeout", "60"]
        )

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection(self.address, self.port, timeout=2)
        try:
            conn.request("GET", "/v3")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    # -- admin helpers (identity API v3, as the bootstrap admin) -----------------------

    def admin_session(self) -> Any:
        """A keystoneauth1 session scoped to the admin project as the admin user."""
        if self._session is None:
            from keystoneauth1 import session  # noqa: PLC0415 (only needed by tests)
            from keystoneauth1.identity import v3  # noqa: PLC0415

            auth = v3.Password(
                auth_url=self.auth_url,
                username=ADMIN_USER,
                password=self.admin_password,
                project_name=ADMIN_PROJECT,
                user_domain_name=DOMAIN,
                project_domain_name=DOMAIN,
            )
            self._session = session.Session(auth=auth)
        return self._session

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One identity API call; its JSON answer (None for 204)."""
        response = self.admin_session().request(
            f"{self.auth_url}/{path}", method, json=body, raise_exc=False
        )
        if response.status_code >= 400:
            raise KeystoneServerError(
                f"{method} {path} -> {response.status_code}: {response.text[:500]}\n"
                f"{tail(self.log_path)}"
            )
        return response.json() if response.content else None

    def _find(self, collection: str, **filters: str) -> list[dict[str, Any]]:
        query = urlencode(filters)
        found: list[dict[str, Any]] = self._request("GET", f"{collection}?{query}")[collection]
        return found

    def register_image_service(
        self, endpoint_url: str, region: str = REGION, *, internal_url: str | None = None
    ) -> str:
        """Put ``endpoint_url`` in the catalog as the public and internal ``image`` endpoint.

        ``internal_url`` gives the internal endpoint a URL of its own. Creates the ``image``
        service and the region on first use; replaces that service's endpoints in ``region``
        on every call. Returns the service id.
        """
        services = self._find("services", type="image")
        if services:
            service_id = str(services[0]["id"])
        else:
            created = self._request(
                "POST", "services", {"service": {"type": "image", "name": "glance"}}
            )
            service_id = str(created["service"]["id"])
        if not any(r["id"] == region for r in self._find("regions")):
            self._request("POST", "regions", {"region": {"id": region}})
        for endpoint in self._find("endpoints", service_id=service_id):
            if endpoint.get("region_id") == region:
                self._request("DELETE", f"endpoints/{endpoint['id']}")
        urls = {"public": endpoint_url, "internal": internal_url or endpoint_url}
        for interface, url in urls.items():
            self._request(
                "POST",
                "endpoints",
                {
                    "endpoint": {
                        "service_id": service_id,
                        "interface": interface,
                        "url": url,
                        "region_id": region,
                    }
                },
            )
        return service_id

    def create_user(
        self, username: str, password: str, project_name: str, role_name: str = "member"
    ) -> str:
        """A user in domain Default with ``role_name`` on a (new) project; returns the user id."""
        projects = self._find("projects", name=project_name, domain_id="default")
        if projects:
            project_id = str(projects[0]["id"])
        else:
            body = {"project": {"name": project_name, "domain_id": "default"}}
            project_id = str(self._request("POST", "projects", body)["project"]["id"])
        body = {
            "user": {
                "name": username,
                "password": password,
                "domain_id": "default",
                "default_project_id": project_id,
            }
        }
        user_id = str(self._request("POST", "users", body)["user"]["id"])
        [role] = self._find("roles", name=role_name)
        self._request("PUT", f"projects/{project_id}/users/{user_id}/roles/{role['id']}")
        return user_id
