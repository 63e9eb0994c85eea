"""moto in server mode on a free loopback port: EC2, EBS direct APIs, S3, IAM (and STS).

moto answers every AWS service on one endpoint, telling them apart by the request's
signature, so one URL serves as ``EC2_URL`` (and for EBS and S3). It implements the EBS
direct APIs, S3, ``register_image``, tags and image filters; it does *not* implement VM
Import (``import_image`` answers HTTP 500), which the tests drive with botocore's Stubber.

With ``authenticate=True`` moto checks every request's access key against its own IAM
(no user exists, so every key is refused): the "bad credentials" server.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any, Self

import boto3

from ._process import PortDaemon, child_env, spawn_logged, tail, wait_ready
from .ports import LOOPBACK, port_open

#: any key pair works with moto (unless authenticate=True); the account is moto's default
ACCESS_KEY = "AKIAMIGRATIOTEST0001"
SECRET_KEY = "migratio-test-secret-key"
ACCOUNT_ID = "123456789012"
REGION = "eu-west-1"


class MotoServer(PortDaemon):
    """One ``moto_server`` process; its state lives in memory and is reset on request."""

    START_ATTEMPTS = 5

    def __init__(self, workdir: Path, *, authenticate: bool = False) -> None:
        super().__init__()
        self.workdir = workdir
        self.authenticate = authenticate

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` — the EC2_URL (and EBS/S3 endpoint) of the fake region."""
        return self.endpoint

    @property
    def log_path(self) -> Path:
        return self.workdir / ("moto-auth.log" if self.authenticate else "moto.log")

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        problem = self._serve_on_a_free_port()
        if problem:
            raise RuntimeError(f"moto_server did not start: {problem}\n{tail(self.log_path)}")
        return self

    def _serve(self) -> str:
        moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if moto is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        env = child_env(MOTO_EC2_LOAD_DEFAULT_AMIS="false")
        if self.authenticate:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self._proc, self._log_file = spawn_logged(
            [moto, "-H", LOOPBACK, "-p", str(self.port)],
            cwd=self.workdir,
            env=env,
            log_path=self.log_path,
        )
        problem = wait_ready(self._proc, lambda: port_open(self.port), timeout=30)
        if problem:
            self.stop()
        return problem

    def reset(self) -> None:
        """Forget every snapshot, image, bucket and tag (moto's own reset endpoint)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (loopback)
            answer.read()

    def client(self, service: str, region: str = REGION) -> Any:
        """A boto3 client of this server, for the tests' own look at what arrived."""
        session = boto3.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=region
        )
        return session.client(service, endpoint_url=self.url)  # type: ignore[call-overload]

    def site_conf(self, *, region: str = REGION, **extra: str) -> str:
        """The text of a ``config/<amazon site>.conf`` pointing at this server, with keys."""
        lines = [
            f"export AWS_REGION={region}",
            f"export EC2_URL={self.url}",
            f"export AWS_ACCESS_KEY={ACCESS_KEY}",
            f"export AWS_SECRET_KEY={SECRET_KEY}",
        ]
        lines += [f"export {key}={value}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"
