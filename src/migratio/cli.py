"""The ``migratio`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from migratio import __version__
from migratio.adapters.ssh import SshMaster
from migratio.atmosphere.keys import AMAZON_MIGRATOR, OPENSTACK_MIGRATOR, Keys, migration_queue
from migratio.atmosphere.status import FanOut, LogSink, StatusSink
from migratio.config import OpenStackSite, Settings, default_config_path, load_settings
from migratio.errors import Cancelled, ConfigError, MigratioError, RedisFailure
from migratio.logs import setup_logging
from migratio.redis_client import connect, describe, is_outage, probe, redis_errors
from migratio.request import MigrationRequest, Outcome

# redis-py, the lease, the service, RQ, the metrics and the overview are imported by the
# commands that use them: ``migrate`` starts its SSH login (:func:`early_login`) once the
# configuration is loaded, and waits for every module imported before that.

log = logging.getLogger("migratio")

EXIT_OK = 0
EXIT_FAILED = 1
#: bad arguments (argparse's own code for usage errors)
EXIT_USAGE = 2
EXIT_CONFIG = ConfigError.exit_code
EXIT_REDIS = RedisFailure.exit_code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with a sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="migratio",
        description="Move Glance VM templates between Atmosphere compute sites.",
    )
    parser.add_argument("--version", action="version", version=f"migratio {__version__}")
    # --config and -v work before the command and after it (migratio --config F check)
    parser.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="config.yml to use (default: $MIGRATIO_CONFIG, else ./config.yml)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log to stderr too"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="migrate one image now, in the foreground",
        description="Migrate one image of this site to DEST_SITE now, printing each status "
        "line. Exit 0 when it is migrated or was already there.",
    )
    migrate.add_argument("image_uuid", metavar="IMAGE_UUID", help="the image's id on this site")
    migrate.add_argument("dest_site", metavar="DEST_SITE", help="the destination's site id")
    migrate.set_defaults(handler=cmd_migrate)

    check = commands.add_parser(
        "check",
        parents=[common],
        help="check tools, credentials and destinations",
        description="Preflight: local tools, the source Glance, and for each destination SSH "
        "login with a verified host key and the remote glance CLI (or the Glance API). "
        "Exit 0 when nothing failed.",
    )
    check.add_argument("sites", metavar="SITE", nargs="*", help="destinations (default: all)")
    check.set_defaults(handler=cmd_check)

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run the service: Atmosphere's jobs in, RQ workers, status back",
        description="Take this site's jobs from Atmosphere's Redis queue in arrival order and "
        "run them on 'workers' RQ worker processes; report every step to Atmosphere. "
        "SIGTERM: warm stop (current jobs finish); a second SIGTERM: cold stop.",
    )
    run.set_defaults(handler=cmd_run)

    worker = commands.add_parser(
        "worker",
        parents=[common],
        help="run one RQ worker (run starts them; start more on other hosts)",
        description="One RQ worker for this site's migrations, against the same Redis.",
    )
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(handler=cmd_worker)

    status_cmd = commands.add_parser(
        "status",
        parents=[common],
        help="every job of this site and its state",
        description="Jobs waiting in Atmosphere's queue, in flight, queued for the workers, "
        "running (with the last status line and its age), scheduled for a retry (with when), "
        "deferred, failed (with the reason), finished and canceled, and refused payloads "
        "(dead letters). Up to 20 are listed per state; the counts are complete.",
    )
    status_cmd.add_argument(
        "--json", action="store_true", help="print one JSON document (see the README) instead"
    )
    status_cmd.set_defaults(handler=cmd_status)

    enqueue = commands.add_parser(
        "enqueue",
        parents=[common],
        help="push a migration job exactly as Atmosphere does",
        description="Push a Sidekiq job for IMAGE_UUID to DEST_SITE on this site's queue, "
        "byte for byte as Atmosphere's Sidekiq::Client.push (for trying things out).",
    )
    enqueue.add_argument("image_uuid", metavar="IMAGE_UUID")
    enqueue.add_argument("dest_site", metavar="DEST_SITE")
    enqueue.add_argument("--amazon", action="store_true", help="an OpenStack → Amazon job")
    enqueue.set_defaults(handler=cmd_enqueue)

    retry = commands.add_parser(
        "retry",
        parents=[common],
        help="run a failed job again",
        description="Move failed jobs (by RQ job id, as 'migratio status' lists them) back "
        "to the queue.",
    )
    retry.add_argument("job_ids", metavar="JOB_ID", nargs="+")
    retry.set_defaults(handler=cmd_retry)
    return parser


def _settings(
    args: argparse.Namespace, *, log_level: int | None = None, log_file: str = "migratio.log"
) -> Settings:
    """Load the configuration; with ``log_level``, also start logging (stderr at that level)."""
    settings = load_settings(args.config or default_config_path())
    if log_level is not None:
        verbose = getattr(args, "verbose", False)
        level = min(log_level, logging.INFO) if verbose else log_level
        setup_logging(
            settings.log_dir,
            stderr_level=level,
            filename=log_file,
            keep_days=settings.log_keep_days,
        )
        args.logging = True
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    """``migratio migrate IMAGE_UUID DEST_SITE``."""
    settings = _settings(args, log_level=logging.ERROR)
    cancel = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        cancel.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def to_stdout(text: str) -> None:
        print(text, flush=True)

    sink = FanOut(to_stdout, LogSink(log))
    try:
        request = MigrationRequest(args.image_uuid, args.dest_site)
    except MigratioError as exc:
        sink(exc.status_line())
        return EXIT_FAILED
    try:
        with early_login(settings, request.destination) as master:
            # imported here: glanceclient and boto3 take ~0.7 s that the service and the
            # operator commands should not pay (and the login above goes on meanwhile)
            from migratio.migration import migrate  # noqa: PLC0415

            with leased(settings, request, cancel, sink) as fence:
                result = migrate(settings, request, sink, cancel=cancel, fence=fence, master=master)
    except MigratioError as exc:
        log.debug("migration failed", exc_info=True)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILED
    except Exception:
        log.exception("internal error migrating %s to %s", args.image_uuid, args.dest_site)
        to_stdout("Error: internal error; the traceback is in the log")
        return EXIT_FAILED
    if result.outcome is Outcome.ALREADY_THERE:
        log.info("image %s was already at %s", args.image_uuid, args.dest_site)
    return EXIT_OK


@contextmanager
def early_login(settings: Settings, destination: str) -> Iterator[SshMaster | None]:
    """The SSH master connection to ``destination`` (an OpenStack site with REGISTER=ssh),
    started at once, or None for any other site.

    Its login (about ten round trips, host key checked as ever) goes on while the rest of
    migratio is imported (~1 s) and the lease taken, instead of after: the first byte moves
    that much sooner. It only logs in: nothing is looked up or written there before the
    migration holds the lease.
    """
    try:
        site = settings.site(destination)
    except MigratioError:
        yield None  # leased() reports it
        return
    if not isinstance(site, OpenStackSite) or site.register != "ssh" or site.ssh is None:
        yield None
        return
    with SshMaster(site.ssh) as master:
        yield master


@contextmanager
def leased(
    settings: Settings, request: MigrationRequest, cancel: threading.Event, sink: StatusSink
) -> Iterator[Callable[[], None]]:
    """The pair's lease for a migration in the foreground (waits while a job holds it).

    Yields the fence for :func:`migratio.migration.migrate`. Without Redis it says so and
    runs unfenced (a first try by hand need not have Redis yet). Errors go to ``sink``.
    """
    try:
        settings.site(request.destination)
    except MigratioError as exc:
        sink(exc.status_line())
        raise
    from redis.exceptions import RedisError  # noqa: PLC0415 (see the imports)

    from migratio.lease import Lease  # noqa: PLC0415

    try:
        lease = Lease(
            connect(settings.redis_url, settings.redis_tls),
            Keys(settings.namespace),
            settings.name,
            request.image_id,
            request.destination,
            job_id=f"cli-{os.getpid()}",
        )
        waiting = False
        while not lease.acquire():
            if not waiting:
                waiting = True
                sink(
                    f"Waiting: another migration of image {request.image_id} to "
                    f"{request.destination} is running ({lease.holder()})"
                )
            if cancel.wait(2):
                error = Cancelled("stopped while waiting for another migration of the image")
                sink(error.status_line())
                raise error
    except (RedisError, RedisFailure) as exc:
        problem = (
            exc.message
            if isinstance(exc, RedisFailure)
            else describe(exc, settings.redis_url).message
        )
        sink(
            f"Warning: {problem}; migrating without the lease that keeps this image to "
            f"{request.destination} to one migration at a time"
        )
        yield lambda: None
        return
    with lease.held(cancel) as held:
        yield held.fence


def cmd_check(args: argparse.Namespace) -> int:
    """``migratio check [SITE...]``."""
    settings = _settings(args, log_level=logging.ERROR)
    print(f"ok       configuration: {settings.config_path} (site {settings.name})", flush=True)
    from migratio.preflight import Level, run_checks  # noqa: PLC0415 (as in cmd_migrate)

    worst = Level.OK
    for check in run_checks(settings, args.sites):
        print(check, flush=True)
        if check.level is Level.FAIL:
            worst = Level.FAIL
    return EXIT_FAILED if worst is Level.FAIL else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``migratio run`` (also ``migratio-run``)."""
    settings = _settings(args, log_level=logging.INFO)
    from migratio import metrics  # noqa: PLC0415 (see the imports)
    from migratio.service import Service, connect, worker_command  # noqa: PLC0415

    redis = connect(settings)
    try:  # what check proves of Redis: login, version, the keys, BLMOVE
        for _ in probe(redis, settings.redis_url, settings.namespace, settings.name):
            pass
    except RedisFailure as exc:
        if not is_outage(exc.__cause__):
            raise  # a password, a certificate, an ACL, an old Redis: waiting will not fix it
        # unreachable: the service waits it out (and says so once)
    for warning in settings.warnings:
        log.warning("%s", warning)
    for site_id, error in sorted(settings.broken_sites.items()):
        log.error("site %s: its jobs fail until the file is fixed: %s", site_id, error)
    service = Service(settings, redis, worker_argv=worker_command(settings.config_path))
    metrics.serve(settings, service)
    return service.run()


def cmd_worker(args: argparse.Namespace) -> int:
    """``migratio worker``."""
    settings = _settings(args, log_level=logging.INFO, log_file="worker.log")
    from migratio.service import environment_for_workers, run_worker  # noqa: PLC0415

    environment_for_workers(settings.config_path)  # the work-horses load it from there
    with redis_errors(settings.redis_url):
        run_worker(settings, burst=args.burst)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """``migratio status``."""
    settings = _settings(args)
    from migratio.overview import overview  # noqa: PLC0415 (see the imports)
    from migratio.service import connect  # noqa: PLC0415

    with redis_errors(settings.redis_url):
        snapshot = overview(settings, connect(settings))
    if args.json:
        print(snapshot.to_json())
    else:
        for line in snapshot.lines():
            print(line)
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace) -> int:
    """``migratio enqueue IMAGE_UUID DEST_SITE [--amazon]``."""
    settings = _settings(args)
    try:
        MigrationRequest(args.image_uuid, args.dest_site)
        kind = settings.site(args.dest_site).kind
        if (kind == "amazon") != args.amazon:
            raise ConfigError(
                f"{args.dest_site} is an {'Amazon' if kind == 'amazon' else 'OpenStack'} site: "
                + ("add --amazon" if kind == "amazon" else "drop --amazon")
            )
    except MigratioError as exc:
        print(f"migratio enqueue: {exc.message}; nothing was pushed", file=sys.stderr)
        return EXIT_USAGE
    from migratio.atmosphere.sidekiq import payload, push  # noqa: PLC0415 (see the imports)
    from migratio.service import connect  # noqa: PLC0415

    keys = Keys(settings.namespace)
    job_class = AMAZON_MIGRATOR if args.amazon else OPENSTACK_MIGRATOR
    queue = migration_queue(settings.name)
    body = payload(queue, job_class, [args.image_uuid, args.dest_site])
    with redis_errors(settings.redis_url, f"pushing to {keys.queue(queue)}"):
        push(connect(settings), keys, queue, body)
    print(body)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """``migratio retry JOB_ID...``."""
    settings = _settings(args)
    from migratio.operations import retry_failed  # noqa: PLC0415 (see the imports)
    from migratio.service import connect  # noqa: PLC0415

    code = EXIT_OK
    redis = connect(settings)
    for job_id in args.job_ids:
        try:
            with redis_errors(settings.redis_url):
                retry_failed(settings, redis, job_id)
            print(f"{job_id}: queued again")
        except RedisFailure:
            raise
        except MigratioError as exc:
            print(f"{job_id}: {exc.message}", file=sys.stderr)
            code = EXIT_FAILED
    return code


def run_main() -> int:
    """``migratio-run``: the original's command name for the service."""
    return main(["run", *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``migratio`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except RedisFailure as exc:
        if getattr(args, "logging", False):  # run, worker: to the log file and stderr
            log.error("%s", exc.message)
        else:
            print(f"Redis error: {exc.message}", file=sys.stderr)
        return EXIT_REDIS
    return code


if __name__ == "__main__":
    sys.exit(main())
