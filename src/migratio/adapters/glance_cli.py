"""Adapter for the destination host's ``glance`` CLI, run over SSH as the original did.

Every argument is quoted by :mod:`migratio.adapters.ssh`; the CLI's tables are parsed here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from migratio.adapters import processes
from migratio.adapters.ssh import SshClient
from migratio.config import OpenStackSite
from migratio.errors import MetadataError, RemoteError, quietly
from migratio.images import ImageRecord
from migratio.openstack.copies import PROBE_FIELDS

log = logging.getLogger(__name__)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: a staging file's name: the image, 12 hex digits of its digest, and the site's tag
_STAGED = re.compile(r".{36}-.{12}-([0-9a-f]{8})\.", re.DOTALL)
_ROW = re.compile(r"^\|\s?(.*?)\s*\|\s?(.*?)\s*\|$")
#: ``image-show --max-column-width``: wide enough that no value is ever wrapped
WIDE = "1000000000"
#: seconds the listing of what an earlier attempt left may take (one round trip, normally)
STAGED_LISTING_TIMEOUT = 30
#: the image fields ``glance image-create`` takes as options of their own
CORE_OPTIONS = ("name", "disk_format", "container_format", "min_disk", "min_ram")


def parse_table(text: str, *, wrapped: bool = True) -> dict[str, str]:
    """Parse the CLI's two-column ``| Property | Value |`` table.

    Cells are cut where the border line puts the column edge, so a ``|`` inside a value is
    kept. Rows with an empty first column continue the value above: with ``wrapped`` (a
    table drawn at the CLI's default width of 80) they are the rest of a wrapped long value
    and are joined back as they are (hashes and ids have no spaces); without it (``image-show
    --max-column-width`` wide) they are the further lines of a multi-line value. A value's
    trailing spaces cannot be told from the table's padding and are lost.
    """
    return _Table.read(text, wrapped=wrapped).values


@dataclass(frozen=True)
class _Table:
    """What one pass over a CLI table finds: the values (as :func:`parse_table` gives them),
    the keys whose value took more than one row, and whether a key came twice."""

    values: dict[str, str]
    continued: frozenset[str]
    repeated: bool

    @classmethod
    def read(cls, text: str, *, wrapped: bool = True) -> _Table:
        values: dict[str, str] = {}
        continued: set[str] = set()
        repeated = False
        last: str | None = None
        for key, value in _rows(text):
            if key:
                repeated = repeated or key in values
                values[key] = value
                last = key
            elif last is not None:
                values[last] += value if wrapped else "\n" + value
                continued.add(last)
        return cls(values, frozenset(continued), repeated)


def _rows(text: str) -> Iterator[tuple[str, str]]:
    """The table's rows below its header, as (first cell, second cell)."""
    width: int | None = None
    borders = 0
    for line in text.split("\n"):
        if line.startswith("+-"):
            borders += 1
            if width is None and len(line.split("+")) > 2:
                width = len(line.split("+")[1]) - 2
            continue
        if borders < 2 or not line.startswith("|"):
            continue  # before the header's lower border: the header itself
        row = _split_row(line, width)
        if row is not None:
            yield row


def _split_row(line: str, width: int | None) -> tuple[str, str] | None:
    if width is not None and line[width + 2 : width + 5] == " | " and line.endswith(" |"):
        return line[2 : width + 2].rstrip(), line[width + 5 : -2].rstrip()
    match = _ROW.match(line.strip())  # a key of wide characters: cells by their separators
    return (match.group(1), match.group(2)) if match else None


def as_shown(text: str) -> str:
    """``text`` as :func:`parse_table` reads it back from a wide table (line ends trimmed)."""
    return "\n".join(line.rstrip() for line in text.split("\n"))


def parse_ids(text: str) -> list[str]:
    """Image ids from the first column of ``glance image-list``."""
    ids = []
    for line in text.splitlines():
        cells = line.strip().strip("|").split("|")
        if cells and _UUID.fullmatch(cells[0].strip()):
            ids.append(cells[0].strip())
    return ids


def _plain(text: str) -> bool:
    """Whether ``text``, wrapped into rows of a table, joins back as it was: printable
    (no escape, control or format character) and without whitespace, and not empty."""
    return text.isprintable() and " " not in text and text != ""


def find_path(path: str) -> str:
    """``path`` as ``find`` takes it: it has no ``--``, and reads a first word that starts
    with ``-`` as an expression (``REMOTE_STAGING_DIR=-x``); the upload helper takes it so too."""
    return f"./{path}" if path.startswith("-") else path


def site_tag(site_id: str) -> str:
    """Eight hex digits that tell one site's staging files from another's: sites reached
    through the same account share its staging directory, and each sends the file itself."""
    return hashlib.sha256(site_id.encode()).hexdigest()[:8]


def staging_name(image_id: str, digest: str, site_id: str, disk_format: str) -> str:
    """The name of the file (its pieces: ``.0``, ``.1``...) sent there for ``site_id``."""
    return f"{image_id}-{digest[:12]}-{site_tag(site_id)}.{disk_format}.part"


def tag_of(name: str) -> str | None:
    """The site tag in a staging file's name (None: named before files had one)."""
    match = _STAGED.match(name)
    return match.group(1) if match else None


def _names(image_id: str, disk_format: str, tags: Sequence[str | None] | None) -> list[str]:
    """``find`` tests for the staging files of ``image_id``: of every site, or of ``tags``
    only (None: the files named before they had a site's tag), joined by ``-o``."""
    every = f"{image_id}-*.{disk_format}.part*"
    if tags is None:
        return ["-name", every]
    digest = "?" * 12
    tests: list[str] = []
    for tag in tags:
        if tests:
            tests.append("-o")
        if tag is None:
            tests += ["(", "-name", every, "!", "-name", f"{image_id}-{digest}-????????.*", ")"]
        else:
            tests += ["-name", f"{image_id}-{digest}-{tag}.{disk_format}.part*"]
    return ["(", *tests, ")"]


def upload_way(printed: str) -> str:
    """How the upload helper put the file into Glance, as it said (``via http``, ``via cli
    (why)``); an older helper, or REMOTE_UPLOAD=cli, says nothing: the glance CLI."""
    for line in printed.splitlines():
        if line.startswith("upload via "):
            return line[len("upload ") :]
    return "via cli"


def follow_upload_source() -> str:
    """The Python source of the remote helper that feeds the growing file to glance."""
    return resources.files("migratio.remote").joinpath("follow_upload.py").read_text("utf-8")


def _json_lines(printed: str, words: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """``(word, value)`` of the helper's lines ``WORD JSON`` for these words (a line whose
    JSON does not parse gives ``None``)."""
    for line in printed.splitlines():
        word, _, rest = line.partition(" ")
        if word in words:
            try:
                yield word, json.loads(rest)
            except ValueError:
                yield word, None


def _is_record(value: Any) -> bool:
    """Whether ``value`` is an image as Glance's API gives it (an object with an id)."""
    return isinstance(value, dict) and isinstance(value.get("id"), str)


class RemoteGlance:
    """The ``glance`` CLI on a destination host, with that host's ``~/.creds``."""

    def __init__(self, site: OpenStackSite, *, timeout: float = 600) -> None:
        assert site.ssh is not None
        self.site = site
        self.ssh = SshClient(site.ssh, creds=site.remote_creds)
        self.timeout = timeout
        #: whether this CLI's ``image-show`` takes ``--max-column-width`` (older ones do not)
        self.wide_tables = True
        #: whether the helper may look images up (REMOTE_UPLOAD=auto; it could until now)
        self.helper_lookups = True

    def _glance(self, *args: str) -> list[str]:
        return [self.site.remote_glance, "--os-image-api-version", "2", *args]

    def _run(self, what: str, *args: str) -> processes.Completed:
        return self.ssh.run(self._glance(*args), what=f"glance {what}", timeout=self.timeout)

    def get(self, image_id: str) -> ImageRecord | None:
        """The image, or None when the destination has no such image.

        The table is asked for wide, so that names and property values are not wrapped.
        """
        wide = ["--max-column-width", WIDE] if self.wide_tables else []
        done = self.ssh.run(
            self._glance("image-show", *wide, image_id),
            what="glance image-show",
            timeout=self.timeout,
            check=False,
        )
        if done.returncode != 0 and self.wide_tables and "--max-column-width" in done.stderr:
            self.wide_tables = False  # an old CLI without the option: its 80 columns it is
            return self.get(image_id)
        if done.returncode != 0:
            if "No image with" in done.stderr or "404" in done.stderr:
                return None
            raise RemoteError(f"glance image-show {image_id} failed: {done.tail()}")
        return ImageRecord.from_glance(parse_table(done.stdout, wrapped=not self.wide_tables))

    def find(self, **filters: str) -> list[ImageRecord]:
        """Images whose properties equal ``filters``.

        With ``REMOTE_UPLOAD=auto`` the helper asks Glance's API (:meth:`_find_by_helper`):
        one short Python of the standard library, where ``glance image-list`` and an
        ``image-show`` for each cost the destination host a second of CPU and the migration
        that second before its upload can start. The CLI asks when the helper cannot.
        """
        if self.site.remote_upload == "auto" and self.helper_lookups:
            found = self._find_by_helper(filters)
            if found is not None:
                return found
        args = ["image-list"]
        for key, value in filters.items():
            args.append(f"--property-filter={key}={value}")
        ids = parse_ids(self._run("image-list", *args).stdout)
        return [image for image in (self.get(i) for i in ids) if image is not None]

    def _find_by_helper(self, filters: Mapping[str, str]) -> list[ImageRecord] | None:
        """The helper's ``--find``: the images, or None (said why, once) when the CLI must."""
        done = self.ssh.run(
            [self.site.remote_python, "-c", follow_upload_source(), "--find",
             *(f"{key}={value}" for key, value in filters.items())],
            what="remote glance lookup",
            timeout=self.timeout,
            check=False,
        )  # fmt: skip
        why = f"the helper there exited {done.returncode}: {done.tail()}"
        for _, records in _json_lines(done.stdout, ("images",)):
            if isinstance(records, list) and all(_is_record(r) for r in records):
                return [ImageRecord.from_glance(record) for record in records]
            why = "the helper's list of images there was not JSON"
        for line in done.stdout.splitlines():
            if line.startswith("unsupported "):
                why = line[len("unsupported ") :]
        log.info("looking up images at %s with the glance CLI (%s)", self.site.site_id, why)
        self.helper_lookups = False
        return None

    def own_project(self) -> str | None:
        """The project images made there belong to: a probe image's (made and deleted)."""
        made = self._run("image-create", *self.create_args(PROBE_FIELDS))  # stdin closed: no data
        probe = ImageRecord.from_glance(parse_table(made.stdout))
        try:
            return probe.owner
        finally:
            quietly(self.delete, probe.id)
            quietly(self.delete_old_probes, probe)

    def delete_old_probes(self, probe: ImageRecord) -> None:
        """Delete the probes of attempts killed while they probed (ours, never given data);
        learning the owner is what they were doing, so only the next probe finds them."""
        for old in self.find(name=str(PROBE_FIELDS["name"])):
            if old.id != probe.id and old.owner == probe.owner and old.status == "queued":
                self.delete(old.id)

    def check_fields(self, image_id: str, fields: Mapping[str, Any]) -> None:
        """Refuse, before anything is sent, what ``--property KEY=VALUE`` cannot carry."""
        for key in fields:
            if key in CORE_OPTIONS:
                continue
            problem = None
            if not key:
                problem = "is empty"
            elif "=" in key:
                problem = "contains '=' (the glance CLI splits --property at the first '=')"
            elif not key.isprintable():
                problem = "contains a control or escape character (the CLI's table mangles it)"
            elif "|" in key and not key.isascii():
                problem = "contains '|' and non-ASCII text (the CLI's table cannot be read back)"
            if problem is not None:
                raise MetadataError(
                    f"image {image_id} has a property key {key!r} that {problem}, so site "
                    f"{self.site.site_id} (REGISTER=ssh, through the glance CLI) cannot register "
                    "it exactly: rename the property, or register there with REGISTER=api"
                )

    def as_created(self, printed: str, fields: Mapping[str, Any]) -> ImageRecord | None:
        """The image that ``glance image-create`` printed once it had uploaded the data (it
        reads the image back itself), if that table shows every one of ``fields`` as
        :meth:`get` would (None: ask :meth:`get`, wide). Saves a start of the CLI at the end
        of each upload.

        Its values are wrapped at 80 columns: one that took several rows is read back exactly
        only if it is printable text without spaces (a hash: cut anywhere, joined back as it
        was). Wrapping drops the whitespace it breaks at, and the CLI's wrapper (wcwidth's)
        repeats terminal escape sequences on every line it makes."""
        table = _Table.read(printed)
        values, wrapped = table.values, table.continued
        if "id" not in values or any(key not in values for key in fields):
            return None
        if table.repeated:
            return None  # a key over 80 columns wrapped too: its rest may read as another key
        if wrapped & {"id", "status", "size", "checksum"} or any(
            key in wrapped and not (_plain(str(value)) and _plain(values[key]))
            for key, value in fields.items()
        ):
            return None
        return ImageRecord.from_glance(values)

    def readback(self, text: str) -> str:
        """What of a name or property value :meth:`get` can show: compare these forms."""
        return as_shown(text) if self.wide_tables else "".join(text.split())

    def create_args(self, fields: Mapping[str, Any]) -> list[str]:
        """``glance image-create`` arguments for an image with ``fields``.

        Every value is joined to its option with ``=``, so that none (a name like
        ``-centos7-base``, a value like ``--x``) can be taken for an option of its own.
        """
        args = ["image-create"]
        properties: dict[str, Any] = dict(fields)
        for core in CORE_OPTIONS:
            if core in properties:
                value = properties.pop(core)
                args.append(f"--{core.replace('_', '-')}={value}")
        for key, value in properties.items():
            args.append(f"--property={key}={value}")
        return args

    def start_follow_create(
        self,
        fields: Mapping[str, Any],
        remote_path: str,
        size: int,
        algo: str,
        digest: str,
        idle: float,
        segment_size: int | None = None,
    ) -> processes.Child:
        """Start creating the image there from ``remote_path`` while rsync still writes it.

        The helper feeds the growing file to Glance and only lets the upload finish on exactly
        ``size`` bytes with the right digest: with ``REMOTE_UPLOAD=auto`` through Glance's API
        itself, when it understands the credentials there, else into ``glance image-create``
        (which reads its data from stdin). What it printed is read by :meth:`uploaded`.
        With ``segment_size`` the file arrives as ``remote_path.0``, ``.1``... (one per stream).
        """
        helper = [self.site.remote_python, "-c", follow_upload_source()]
        if segment_size:
            helper.append(f"--segment-size={segment_size}")
        if self.site.remote_upload == "auto":
            helper.append(f"--http-fields={json.dumps(dict(fields), sort_keys=True)}")
        # a path that starts with "-" (REMOTE_STAGING_DIR=--x) is never taken for an option
        args = [find_path(remote_path), str(size), algo, digest, str(int(idle)), "--"]
        command = self._glance(*self.create_args(fields))
        return self.ssh.start([*helper, *args, *command], what="remote glance upload")

    def uploaded(
        self, printed: str, fields: Mapping[str, Any]
    ) -> tuple[ImageRecord | None, ImageRecord | None]:
        """From what the upload helper printed: the image it made (None: none, or not known),
        and that image as Glance showed it at the end (None: ask :meth:`get`)."""
        made = {
            word: record
            for word, record in _json_lines(printed, ("created", "image"))
            if _is_record(record)
        }
        if made:  # the helper talked to Glance's API itself: its JSON, exactly
            final = made.get("image")
            return (
                ImageRecord.from_glance(made.get("created") or made["image"]),
                ImageRecord.from_glance(final) if final is not None else None,
            )
        table = parse_table(printed)
        if "id" not in table:
            return None, None
        return ImageRecord.from_glance(table), self.as_created(printed, fields)

    def delete(self, image_id: str) -> None:
        """Delete an image there; one that is already gone is fine."""
        done = self.ssh.run(
            self._glance("image-delete", image_id),
            what="glance image-delete",
            timeout=self.timeout,
            check=False,
        )
        if done.returncode != 0 and "No image with" not in done.stderr + done.stdout:
            raise RemoteError(f"glance image-delete {image_id} failed: {done.tail()}")

    def list_parts(self, remote_dir: str, *, older_than_minutes: int = 0) -> list[str]:
        """Names of the staging files there (last written more than the minutes given ago)."""
        age = ["-mmin", f"+{older_than_minutes}"] if older_than_minutes > 0 else []
        done = self.ssh.run(
            ["find", find_path(remote_dir), "-maxdepth", "1", "-type", "f", "-name", "*.part*",
             *age, "-printf", "%f\\n"],
            what="list remote staging files",
            creds=False,
            check=False,
        )  # fmt: skip
        if done.returncode != 0 and "No such file" in done.stderr:
            return []
        if done.returncode != 0:
            raise RemoteError(f"listing {remote_dir} at {self.site.site_id} failed: {done.tail()}")
        return [name for name in done.stdout.splitlines() if _UUID.match(name)]

    def staged_sizes(
        self, remote_dir: str, image_id: str, disk_format: str = "*"
    ) -> dict[str, int]:
        """The staging files of ``image_id`` there (one file, or pieces; in ``disk_format``,
        or in any): name → bytes. What an interrupted attempt left, for the next one to resume."""
        done = self.ssh.run(
            ["find", find_path(remote_dir), "-maxdepth", "1", "-type", "f",
             "-name", f"{image_id}-*.{disk_format}.part*", "-printf", "%f %s\\n"],
            what="list remote staging files",
            timeout=STAGED_LISTING_TIMEOUT,  # the transfer waits for it
            creds=False,
            check=False,
        )  # fmt: skip
        if done.returncode != 0 and "No such file" in done.stderr:
            return {}
        if done.returncode != 0:
            raise RemoteError(f"listing {remote_dir} at {self.site.site_id} failed: {done.tail()}")
        sizes = {}
        for line in done.stdout.splitlines():
            name, _, size = line.rpartition(" ")
            if name.startswith(f"{image_id}-") and size.isdigit():
                sizes[name] = int(size)
        return sizes

    def remove_parts(
        self,
        remote_dir: str,
        image_id: str,
        disk_format: str = "*",
        tags: Sequence[str | None] | None = None,
    ) -> None:
        """Remove the staging files of ``image_id`` there (any attempt's, pieces; of any
        format, or of ``disk_format`` only; every site's, or those with one of ``tags``
        only (:func:`site_tag`; None: untagged): another site reached through the same
        account may be sending the same image right now)."""
        where = find_path(remote_dir)
        names = _names(image_id, disk_format, tags)
        self.ssh.run(
            ["find", where, "-maxdepth", "1", *names, "-delete"],
            what="remove remote staging files",
            creds=False,
        )

    def remove_file(self, remote_path: str) -> None:
        """Remove a staging file there."""
        self.ssh.run(["rm", "-f", "--", remote_path], what="remove remote file", creds=False)
