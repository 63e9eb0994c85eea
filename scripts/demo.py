"""Demo: the real flow on a local sandbox.

Two real Glance servers (site-a, the source; site-b, behind an sshd), a Redis, Atmosphere's side
played by the real Sidekiq gem: a job is pushed as Atmosphere pushes it, ``migratio run`` takes
it and moves the image, and the status lines arrive at a real Sidekiq worker as Atmosphere's
``UpdateMigrationJobStatusWorker`` would receive them. Run through ``bash scripts/demo``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sandbox import sidekiq  # noqa: E402
from tests.sandbox.images import make_qcow2, sha256_file  # noqa: E402
from tests.sandbox.redis_server import RedisServer  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402

from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, migration_queue  # noqa: E402

MiB = 1024 * 1024
MIGRATIO = str(ROOT / ".venv" / "bin" / "migratio")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="migratio-demo-") as tmp:
        work = Path(tmp)
        say("starting Redis, Glance 'site-a' (source), Glance 'site-b' behind an sshd")
        with RedisServer(work / "redis") as redis, Sandbox(work / "sandbox") as sandbox:
            config = sandbox.config_path
            config.write_text(config.read_text() + f"\nredis_url: {redis.url}\n")
            image = make_qcow2(work / "template.qcow2", virtual_size=512 * MiB, data_bytes=64 * MiB)
            image_id = sandbox.source.upload_image(
                image,
                name='demo template "with quotes"; echo hi',
                disk_format="qcow2",
                properties={"architecture": "x86_64", "os_distro": "ubuntu"},
            )
            say(f"source image {image_id} is in site-a's Glance")
            say(f"migratio check --config {config}")
            subprocess.run([MIGRATIO, "check", "--config", str(config)], check=False)

            atmosphere = sidekiq.FeedbackServer(work / "atmosphere", redis.url, "atmosphere")
            with atmosphere:
                say("migratio run (the service, one RQ worker)")
                env = {**os.environ, "MIGRATIO_CONFIG": str(config)}
                service = subprocess.Popen([MIGRATIO, "run"], env=env, stderr=subprocess.DEVNULL)
                try:
                    say(
                        "Atmosphere pushes the job: Sidekiq::Client.push('queue' => "
                        f"'migration_site-a', 'class' => '{OPENSTACK_MIGRATOR}', "
                        "'args' => [uuid, 'site-b'])"
                    )
                    sidekiq.push(
                        redis.url, "atmosphere", migration_queue("site-a"), OPENSTACK_MIGRATOR,
                        [image_id, "site-b"],
                    )  # fmt: skip
                    say("status lines received by Atmosphere::UpdateMigrationJobStatusWorker")
                    shown = 0
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline:
                        received = atmosphere.received()
                        for args in received[shown:]:
                            print(f"   perform{tuple(args)}", flush=True)
                        shown = len(received)
                        if received and received[-1][3].startswith(("Registered", "Error")):
                            break
                        time.sleep(0.2)
                    say("migratio status")
                    subprocess.run([MIGRATIO, "status", "--config", str(config)], check=False)
                finally:
                    service.terminate()
                    service.wait(timeout=60)

            [copy] = sandbox.destination.find_by_property("source_uuid", image_id)
            arrived = work / "arrived"
            sandbox.destination.download_to(str(copy["id"]), arrived)
            same = sha256_file(arrived) == sha256_file(image)
            say(f"site-b now has image {copy['id']} named {copy['name']!r}")
            for key in ("status", "disk_format", "source_uuid", "source_cs", "source_t"):
                print(f"   {key:12} {copy[key]}")
            print(f"   bytes identical to the source: {same}")
            return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
