"""The ``migratio`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from migratio import __version__
from migratio.config import Settings, default_config_path, load_settings
from migratio.errors import ConfigError, MigratioError
from migratio.logs import setup_logging
from migratio.openstack_migration import MigrationRequest, Outcome, migrate_to_openstack
from migratio.preflight import Level, run_checks
from migratio.status import FanOut, LogSink

log = logging.getLogger("migratio")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = ConfigError.exit_code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with a sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="migratio",
        description="Move Glance VM templates between Atmosphere compute sites.",
    )
    parser.add_argument("--version", action="version", version=f"migratio {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config.yml to use (default: $MIGRATIO_CONFIG, else ./config.yml)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
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
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config or default_config_path())


def cmd_migrate(args: argparse.Namespace) -> int:
    """``migratio migrate IMAGE_UUID DEST_SITE``."""
    settings = _settings(args)
    setup_logging(settings.log_dir, stderr_level=logging.INFO if args.verbose else logging.ERROR)
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
        result = migrate_to_openstack(settings, request, sink, cancel=cancel)
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


def cmd_check(args: argparse.Namespace) -> int:
    """``migratio check [SITE...]``."""
    settings = _settings(args)
    setup_logging(settings.log_dir, stderr_level=logging.INFO if args.verbose else logging.ERROR)
    print(f"ok       configuration: {settings.config_path} (site {settings.name})", flush=True)
    worst = Level.OK
    for check in run_checks(settings, args.sites):
        print(check, flush=True)
        if check.level is Level.FAIL:
            worst = Level.FAIL
    return EXIT_FAILED if worst is Level.FAIL else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``migratio`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    return code


if __name__ == "__main__":
    sys.exit(main())
