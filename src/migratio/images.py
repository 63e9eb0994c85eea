"""What migratio knows about a Glance image, whichever way it was read (API or CLI)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from migratio.hashing import Digests

#: properties Glance owns or computes; everything else on an image is the user's
GLANCE_FIELDS = frozenset(
    {
        "id", "name", "status", "visibility", "protected", "checksum", "os_hash_algo",
        "os_hash_value", "owner", "size", "virtual_size", "created_at", "updated_at", "tags",
        "file", "schema", "self", "direct_url", "locations", "disk_format", "container_format",
        "min_disk", "min_ram", "os_hidden", "stores", "members",
    }
)  # fmt: skip
#: the properties that link a migrated image to its source (Atmosphere reads source_t)
LINK_PROPERTIES = ("source_uuid", "source_cs", "source_t")
#: migratio's own record of the source bytes' hash, to recognise converted copies
SOURCE_HASH = "source_hash"
#: on a converted copy: the size and hashes of the converted bytes, as migratio computed them
#: and Glance confirmed them at registration (``size:N md5:HEX sha512:HEX``)
CONVERTED_HASH = "converted_hash"


@dataclass(frozen=True)
class ImageRecord:
    """One Glance image's metadata."""

    id: str
    name: str
    status: str
    size: int | None
    disk_format: str | None
    container_format: str | None
    checksum: str | None = None
    os_hash_algo: str | None = None
    os_hash_value: str | None = None
    min_disk: int = 0
    min_ram: int = 0
    #: the project the image belongs to (None where Glance runs without Keystone)
    owner: str | None = None
    properties: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_glance(cls, data: Mapping[str, Any]) -> ImageRecord:
        """Build from Glance's image JSON (or the CLI's table, where every value is text)."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value in (None, "", "None") else str(value)

        def number(key: str) -> int | None:
            value = text(key)
            return int(value) if value is not None and value.isdigit() else None

        return cls(
            id=str(data["id"]),
            name=text("name") or "",
            status=text("status") or "unknown",
            size=number("size"),
            disk_format=text("disk_format"),
            container_format=text("container_format"),
            checksum=text("checksum"),
            os_hash_algo=text("os_hash_algo"),
            os_hash_value=text("os_hash_value"),
            min_disk=number("min_disk") or 0,
            min_ram=number("min_ram") or 0,
            owner=text("owner"),
            properties={
                str(k): str(v)
                for k, v in data.items()
                if k not in GLANCE_FIELDS and not str(k).startswith("os_glance") and v is not None
            },
        )

    @property
    def digests(self) -> Digests:
        """The hashes Glance recorded for the image's bytes."""
        return Digests(
            size=self.size or 0,
            md5=self.checksum,
            hash_algo=self.os_hash_algo,
            hash_value=self.os_hash_value,
        )

    @property
    def source_hash(self) -> str:
        """``algo:value`` of this image's bytes, as stored in a copy's ``source_hash``."""
        if self.os_hash_algo and self.os_hash_value:
            return f"{self.os_hash_algo}:{self.os_hash_value}"
        return f"md5:{self.checksum}"
