"""Redis as production runs it: TLS, ACL users, and one clear line for every Redis failure."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from redis import Redis
from tests.sandbox import sidekiq
from tests.sandbox.images import make_qcow2, sha256_file
from tests.sandbox.ports import free_port
from tests.sandbox.redis_server import RedisServer
from tests.sandbox.site import Sandbox
from tests.support import settings_for

from migratio.atmosphere.keys import OPENSTACK_MIGRATOR, Keys, migration_queue
from migratio.config import load_settings
from migratio.errors import ConfigError, RedisFailure
from migratio.redis_client import check_version, redacted
from migratio.service import Service

MiB = 1024 * 1024
IMAGE = "6f3c9a0e-1111-2222-3333-444455556666"
#: a password with what URLs and shells find awkward; it must never appear in any output
PASSWORD = "s3cr#t/p@ss:w0rd"
#: the ACL the README gives: the namespace's keys and RQ's, nothing else
ACL = "~atmosphere:* ~rq:* &* +@all"
USERS = {
    "migratio": (PASSWORD, ACL),
    # an ACL that forgot BLMOVE
    "noblmove": (PASSWORD, f"{ACL} -blmove"),
}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("tls-redis"), tls=True, users=USERS) as server:
        yield server


def write_config(tmp: Path, yaml: str) -> Path:
    """A site's files without any service behind them (status and enqueue need only Redis)."""
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / "site-b.conf").write_text("EXTERNAL_USER=u\nEXTERNAL_HOST=127.0.0.1\n")
    (tmp / "creds").write_text(
        "export OS_AUTH_TOKEN=token\nexport OS_IMAGE_URL=http://127.0.0.1:9\n"
    )
    path = tmp / "config.yml"
    path.write_text(f"name: site-a\nnamespace: atmosphere\ncredentials_file: creds\n{yaml}")
    return path


def tls_yaml(server: RedisServer, url: str | None = None, *, ca: bool = True) -> str:
    assert server.tls is not None
    return (
        f"redis_url: '{url or server.url}'\n"
        + (f"redis_ca_file: {server.tls.ca}\n" if ca else "")
        + f"redis_cert_file: {server.tls.client_cert}\nredis_key_file: {server.tls.client_key}\n"
    )


def migratio(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command, as an operator runs it (stdin closed)."""
    return subprocess.run(
        [sys.executable, "-m", "migratio", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line of a failed command, checked: no traceback, no password."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert PASSWORD not in output and quote(PASSWORD, safe="") not in output, output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


# -- redis_url checked at start-up ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "must start with redis://"),
        (f"migratio:{PASSWORD}@localhost:6379", "must start with redis://"),
        ("http://localhost:6379", "must start with redis://"),
        ("redis://", "names no host"),
        ("redis://localhost:6379/abc", "the database must be a number"),
        ("redis://localhost:notaport/0", "not a valid URL"),
        ("unix://", "names no socket path"),
        (f"redis://migratio:{PASSWORD}@127.0.0.1:6379/0", "special characters in the password"),
        (f"redis://migratio:{quote(PASSWORD, safe='')}@:6379/0", "names no host"),
    ],
)
def test_redis_url_is_checked_when_the_configuration_loads(
    tmp_path: Path, url: str, message: str
) -> None:
    path = write_config(tmp_path, f"redis_url: '{url}'\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(path)
    assert str(path) in info.value.message
    assert "s3cr" not in info.value.message and "w0rd" not in info.value.message


def test_tls_files_need_rediss_and_come_in_pairs(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    path = write_config(tmp_path, f"redis_url: redis://h/0\nredis_ca_file: {ca}\n")
    with pytest.raises(ConfigError, match="must then start with rediss://"):
        load_settings(path)
    path = write_config(tmp_path, f"redis_url: rediss://h/0\nredis_cert_file: {ca}\n")
    with pytest.raises(ConfigError, match="set both redis_cert_file and redis_key_file"):
        load_settings(path)
    path = write_config(tmp_path, "redis_url: rediss://h/0\nredis_ca_file: nowhere.crt\n")
    with pytest.raises(ConfigError, match=r"'redis_ca_file' .*nowhere\.crt is not a readable"):
        load_settings(path)


def test_no_scheme_is_a_configuration_error_for_every_command(tmp_path: Path) -> None:
    config = write_config(tmp_path, "redis_url: localhost:6379\n")
    for args in (["check"], ["status"], ["run"], ["enqueue", IMAGE, "site-b"]):
        done = migratio("--config", str(config), *args)
        assert done.returncode == 78, done
        assert "must start with redis://" in one_line(done)


def test_redacted_keeps_the_user_not_the_password() -> None:
    assert redacted("rediss://migratio:p%40ss@h:6380/0") == "rediss://migratio:***@h:6380/0"
    assert redacted("redis://:pw@h/0") == "redis://:***@h/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
    assert redacted(f"redis://u:{PASSWORD}@h/0") == "redis://u:***@h/0"  # not %-encoded
    assert redacted(f"u:{PASSWORD}@h:6379") == "u:***@h:6379"  # no scheme
    assert redacted(f"redis://h/0?password={PASSWORD}&db=1") == "redis://h/0?password=***&db=1"


def test_redis_older_than_6_2_is_refused() -> None:
    assert check_version((6, 2, 0), "redis://h/0") == "Redis 6.2.0"
    with pytest.raises(RedisFailure, match=r"version 6\.0\.16; migratio needs 6\.2 or newer"):
        check_version((6, 0, 16), "redis://h/0")


# -- one line and exit 69 for any Redis failure ------------------------------------------------


def test_commands_against_a_stopped_redis_say_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://migratio:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    config = str(write_config(tmp_path, f"redis_url: '{url}'\n"))
    for args in (
        ["status"],
        ["enqueue", IMAGE, "site-b"],
        ["retry", "migratio-x"],
        ["worker", "--burst"],
    ):
        done = migratio(*args, "--config", config)
        assert done.returncode == 69, done
        line = one_line(done)
        assert f"redis://migratio:***@127.0.0.1:{port}/0" in line
        assert "cannot connect: Connection refused" in line
        assert "check that redis-server runs there" in line
    # the worker's log file has the same line, and no password either
    logged = (tmp_path / "log" / "worker.log").read_text()
    assert "Connection refused" in logged and PASSWORD not in logged and "Traceback" not in logged


def test_wrong_password_and_missing_ca_are_named(tmp_path: Path, tls_redis: RedisServer) -> None:
    wrong = tls_redis.url_for("migratio", "not-the-password")
    config = write_config(tmp_path, tls_yaml(tls_redis, wrong))
    done = migratio("status", "--config", str(config))
    assert done.returncode == 69
    line = one_line(done)
    assert "authentication failed; check the user and password in redis_url" in line

    config.write_text(config.read_text().split("redis_url")[0] + tls_yaml(tls_redis, ca=False))
    for command in (["status"], ["run"]):  # run: waiting would not fix it, so it stops
        done = migratio(*command, "--config", str(config))
        assert done.returncode == 69, done
        output = done.stdout + done.stderr
        assert "Traceback" not in output and PASSWORD not in output
        assert "TLS certificate is not trusted" in output and "set redis_ca_file" in output

    plain = tls_redis.url.replace("rediss://", "redis://")
    config.write_text(config.read_text().split("redis_url")[0] + f"redis_url: '{plain}'\n")
    done = migratio("status", "--config", str(config))
    assert done.returncode == 69
    assert "rediss:// if the server speaks TLS" in one_line(done)


def test_check_proves_redis(tmp_path: Path, tls_redis: RedisServer) -> None:
    config = write_config(tmp_path, tls_yaml(tls_redis))
    done = migratio("check", "--config", str(config), "nowhere")
    assert PASSWORD not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    redis_lines = [line for line in lines if " Redis" in line]
    assert [line.split(":")[0].split() for line in redis_lines] == [
        ["ok", "Redis", "connection"],
        ["ok", "Redis", "version"],
        ["ok", "Redis", "keys"],
        ["ok", "Redis", "BLMOVE"],
    ]
    assert "as user migratio" in redis_lines[0]
    assert "atmosphere:queue:migration_site-a: 0 waiting" in redis_lines[2]

    forgot = tls_redis.url_for("noblmove")
    config = write_config(tmp_path, tls_yaml(tls_redis, forgot))
    done = migratio("--config", str(config), "check", "nowhere")
    assert done.returncode == 1
    [failed] = [line for line in done.stdout.splitlines() if line.startswith("FAILED   Redis")]
    assert "(BLMOVE): permission denied" in failed and "'blmove'" in failed
    assert PASSWORD not in done.stdout + done.stderr
    # run stops at once on it, with that line (waiting would not fix an ACL)
    done = migratio("--config", str(config), "run")
    assert done.returncode == 69
    assert "(BLMOVE): permission denied" in done.stderr and "Traceback" not in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


# -- Atmosphere and migratio on the same TLS + ACL Redis -------------------------------------


def test_a_job_end_to_end_over_tls_with_an_acl_user(
    clean_sandbox: Sandbox, tmp_path: Path, tls_redis: RedisServer
) -> None:
    sb = clean_sandbox
    assert tls_redis.tls is not None
    settings = settings_for(sb, tmp_path, yaml=tls_yaml(tls_redis))
    assert PASSWORD not in repr(settings) and quote(PASSWORD, safe="") not in repr(settings)
    redis: Redis = tls_redis.client()
    redis.flushall()
    image = make_qcow2(tmp_path / "t.qcow2", virtual_size=32 * MiB, data_bytes=4 * MiB)
    image_id = sb.source.upload_image(image, name="over tls", disk_format="qcow2")
    with sidekiq.FeedbackServer(
        tmp_path / "atmosphere", tls_redis.url, settings.namespace, tls=tls_redis.tls
    ) as atmosphere:
        [jid] = sidekiq.push(
            tls_redis.url,
            settings.namespace,
            migration_queue(settings.name),
            OPENSTACK_MIGRATOR,
            [image_id, "site-b"],
            tls=tls_redis.tls,
        )
        from migratio.service import connect  # noqa: PLC0415

        service = Service(settings, connect(settings))
        service.run_once()
        assert service.queue.get_job_ids() == [f"migratio-{jid}"]
        subprocess.run(
            [sys.executable, "-m", "migratio", "worker", "--burst",
             "--config", str(settings.config_path)],
            check=True, timeout=300,
        )  # fmt: skip
        received = atmosphere.wait_for(3)
    lines = [line[3] for line in received if line[0] == image_id]
    assert lines[0].startswith("Migration started")
    assert lines[-1].startswith("Registered")
    [copy] = sb.destination.find_by_property("source_uuid", image_id)
    sb.destination.download_to(str(copy["id"]), tmp_path / "arrived")
    assert sha256_file(tmp_path / "arrived") == sha256_file(image)
    keys = Keys(settings.namespace)
    assert redis.llen(keys.queue(migration_queue(settings.name))) == 0
    logs = "".join(p.read_text() for p in settings.log_dir.glob("*.log"))
    assert PASSWORD not in logs


def test_status_over_tls_hides_the_password(tmp_path: Path, tls_redis: RedisServer) -> None:
    config = write_config(tmp_path, tls_yaml(tls_redis))
    done = migratio("status", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout and quote(PASSWORD, safe="") not in done.stdout
    assert "rediss://migratio:***@127.0.0.1" in done.stdout


def test_enqueue_refuses_what_atmosphere_never_sends(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, "redis_url: redis://127.0.0.1:9/0\n"))
    for args, message in (
        (["not-a-uuid", "site-b"], "'not-a-uuid' is not an image id"),
        (["../../etc/passwd", "site-b"], "not an image id"),
        ([IMAGE, "../../etc/passwd"], "not a plain site name"),
        ([IMAGE, "nowhere"], "unknown destination site 'nowhere'"),
        ([IMAGE, "site-b", "--amazon"], "site-b is an OpenStack site: drop --amazon"),
    ):
        done = migratio("enqueue", "--config", config, *args)
        assert done.returncode == 2, done
        line = one_line(done)
        assert message in line and "nothing was pushed" in line
    # (and none tried to push: there is no Redis at port 9, which would have been exit 69)


def test_config_option_before_the_command(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, "redis_url: redis://127.0.0.1:9/0\n"))
    done = migratio("--config", config, "enqueue", "not-a-uuid", "site-b")
    assert done.returncode == 2 and "not an image id" in done.stderr
    absent = migratio("--config", str(tmp_path / "absent.yml"), "status")
    assert absent.returncode == 78 and "absent.yml: file not found" in absent.stderr


def test_run_waits_out_a_redis_that_is_down(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://migratio:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    config = write_config(tmp_path, f"redis_url: '{url}'\nworkers: 1\n")
    service = subprocess.Popen(
        [sys.executable, "-m", "migratio", "run", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        log = tmp_path / "log" / "migratio.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "waiting for it" not in (
            log.read_text() if log.exists() else ""
        ):
            time.sleep(0.1)
        assert service.poll() is None  # still running: Redis may come back
        with RedisServer(tmp_path / "redis", port=port, users=USERS) as server:
            server.client().lpush("atmosphere:queue:migration_site-a", b"not json")
            while time.monotonic() < deadline + 30 and not server.client().llen(
                "atmosphere:migratio:dead:site-a"
            ):
                time.sleep(0.1)
            assert server.client().llen("atmosphere:migratio:dead:site-a") == 1  # it went on
            service.send_signal(signal.SIGTERM)
            assert service.wait(timeout=60) == 0
    finally:
        if service.poll() is None:
            service.kill()
    out, err = service.communicate()
    text = log.read_text()
    assert text.count("Redis is unreachable; waiting for it: Redis at redis://migratio:***@") == 1
    assert "Redis is back after" in text
    assert PASSWORD not in text + out + err and quote(PASSWORD, safe="") not in text + out + err
    assert "Traceback" not in text + err
