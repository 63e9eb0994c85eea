"""Demo: migrate one image between two real Glance servers on this machine.

Run through ``bash scripts/demo`` (which installs what it needs first).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sandbox.images import make_qcow2, sha256_file  # noqa: E402
from tests.sandbox.site import Sandbox  # noqa: E402

MiB = 1024 * 1024


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="migratio-demo-") as tmp:
        work = Path(tmp)
        say("starting the sandbox: Glance 'site-a' (source), Glance 'site-b' behind an sshd")
        with Sandbox(work / "sandbox") as sandbox:
            image = make_qcow2(work / "template.qcow2", virtual_size=512 * MiB, data_bytes=64 * MiB)
            image_id = sandbox.source.upload_image(
                image,
                name='demo template "with quotes"; echo hi',
                disk_format="qcow2",
                properties={"architecture": "x86_64", "os_distro": "ubuntu"},
            )
            say(f"source image {image_id} uploaded to site-a")
            migratio = str(ROOT / ".venv" / "bin" / "migratio")
            config = str(sandbox.config_path)
            say(f"migratio check   (config: {config})")
            subprocess.run([migratio, "check", "--config", config], check=False)
            for site in ("site-b", "site-b"):
                say(f"migratio migrate {image_id} {site}")
                argv = [migratio, "migrate", "--config", config, image_id, site]
                subprocess.run(argv, check=True)
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
