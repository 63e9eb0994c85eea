"""Atmosphere's side, played by the real Sidekiq gem (Debian's ruby-sidekiq 6.4).

``push`` enqueues exactly as Atmosphere's ``Sidekiq::Client.push``; ``FeedbackServer`` is a real
Sidekiq server running an ``Atmosphere::UpdateMigrationJobStatusWorker`` that writes every
``perform`` it receives to a file as one JSON line. Both take a ``rediss://`` URL with an ACL user
and the TLS files as Atmosphere's ``config/initializers/sidekiq.rb`` would give them to the
redis gem (``ssl_params``: CA file, client certificate and key).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Self

from ._process import Service, spawn, stop_process
from .redis_server import TlsFiles

#: Atmosphere's redis options: the URL, and for TLS the redis gem's ssl_params
_OPTIONS = r"""
require "openssl"
def sandbox_redis_options(url)
  options = { url: url }
  if ENV["SANDBOX_REDIS_CA"]
    options[:ssl_params] = {
      ca_file: ENV.fetch("SANDBOX_REDIS_CA"),
      cert: OpenSSL::X509::Certificate.new(File.read(ENV.fetch("SANDBOX_REDIS_CERT"))),
      key: OpenSSL::PKey.read(File.read(ENV.fetch("SANDBOX_REDIS_KEY"))),
    }
  end
  options
end
"""

_CLIENT = (
    _OPTIONS
    + r"""
require "sidekiq"
require "redis-namespace"
require "json"
url, namespace, queue, klass, args = ARGV[0], ARGV[1], ARGV[2], ARGV[3], JSON.parse(ARGV[4])
options = sandbox_redis_options(url)
options[:namespace] = namespace unless namespace == "-"
Sidekiq.configure_client { |c| c.redis = options }
count = (ENV["PUSH_COUNT"] || "1").to_i
count.times { puts Sidekiq::Client.push("queue" => queue, "class" => klass, "args" => args) }
"""
)

_WORKER = (
    _OPTIONS
    + r"""
require "sidekiq"
require "redis-namespace"
require "json"
options = sandbox_redis_options(ENV.fetch("SANDBOX_REDIS_URL"))
options[:namespace] = ENV["SANDBOX_NAMESPACE"] unless ENV["SANDBOX_NAMESPACE"] == "-"
Sidekiq.configure_server { |c| c.redis = options }
module Atmosphere
  class UpdateMigrationJobStatusWorker
    include Sidekiq::Worker
    sidekiq_options queue: :feedback, retry: false
    def perform(vmt_uuid, source_tenant_id, dest_tenant_id, status)
      File.open(ENV.fetch("SANDBOX_FEEDBACK_FILE"), "a") do |f|
        f.puts(JSON.generate([vmt_uuid, source_tenant_id, dest_tenant_id, status]))
      end
    end
  end
end
"""
)


def push(
    redis_url: str,
    namespace: str | None,
    queue: str,
    job_class: str,
    args: list[str],
    *,
    count: int = 1,
    tls: TlsFiles | None = None,
) -> list[str]:
    """``Sidekiq::Client.push`` ``count`` times; returns the jids."""
    ns = namespace if namespace is not None else "-"
    done = subprocess.run(
        ["ruby", "-e", _CLIENT, redis_url, ns, queue, job_class, json.dumps(args)],
        check=False,
        capture_output=True,
        text=True,
        env={"PUSH_COUNT": str(count), "PATH": "/usr/bin:/bin", **_tls_env(tls)},
    )
    if done.returncode:
        raise AssertionError(f"Sidekiq::Client.push failed: {done.stderr[-2000:]}")
    return done.stdout.split()


def _tls_env(tls: TlsFiles | None) -> dict[str, str]:
    if tls is None:
        return {}
    return {
        "SANDBOX_REDIS_CA": str(tls.ca),
        "SANDBOX_REDIS_CERT": str(tls.client_cert),
        "SANDBOX_REDIS_KEY": str(tls.client_key),
    }


class FeedbackServer(Service):
    """A real Sidekiq server consuming ``<namespace>:queue:feedback``."""

    def __init__(
        self, workdir: Path, redis_url: str, namespace: str | None, tls: TlsFiles | None = None
    ) -> None:
        self.workdir = workdir
        self.tls = tls
        self.redis_url = redis_url
        self.namespace = namespace
        self.received_file = workdir / "feedback.jsonl"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start ``sidekiq -q feedback`` with the worker class loaded."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        worker = self.workdir / "atmosphere_worker.rb"
        worker.write_text(_WORKER)
        self.received_file.write_text("")
        env = {
            "PATH": "/usr/bin:/bin",
            "SANDBOX_REDIS_URL": self.redis_url,
            "SANDBOX_NAMESPACE": self.namespace if self.namespace is not None else "-",
            "SANDBOX_FEEDBACK_FILE": str(self.received_file),
            **_tls_env(self.tls),
        }
        self._proc = spawn(
            ["sidekiq", "-r", str(worker), "-q", "feedback", "-c", "1"],
            env=env,
            stdout=(self.workdir / "sidekiq.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    def stop(self) -> None:
        """Stop the Sidekiq server."""
        stop_process(self._proc)
        self._proc = None

    def received(self) -> list[list[str]]:
        """Every ``perform(...)`` the worker ran, as argument lists, in order."""
        return [json.loads(line) for line in self.received_file.read_text().splitlines() if line]

    def wait_for(self, count: int, timeout: float = 30) -> list[list[str]]:
        """Wait until at least ``count`` performs were received; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= count:
                return got
            time.sleep(0.1)
        log = (self.workdir / "sidekiq.log").read_text()[-2000:]
        raise AssertionError(f"Sidekiq received {self.received()} (wanted {count}); log: {log}")
