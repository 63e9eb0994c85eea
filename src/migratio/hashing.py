"""Checksums of image bytes as Glance computes them (md5 ``checksum``, ``os_hash_value``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from migratio.errors import VerificationError

BLOCK = 1 << 20


@dataclass(frozen=True)
class Digests:
    """What a file's bytes should hash to: md5 and/or one os_hash algorithm, and its size."""

    size: int
    md5: str | None = None
    hash_algo: str | None = None
    hash_value: str | None = None

    def expected(self) -> dict[str, str]:
        """The algorithm → hex digest pairs to check, strongest first."""
        pairs: dict[str, str] = {}
        if self.hash_algo and self.hash_value:
            pairs[self.hash_algo] = self.hash_value
        if self.md5:
            pairs["md5"] = self.md5
        return pairs

    def cheapest(self) -> tuple[str, str]:
        """One algorithm and digest to check with, preferring the fastest to compute."""
        pairs = self.expected()
        for algo in ("sha256", "sha1", "md5", "sha512"):
            if algo in pairs:
                return algo, pairs[algo]
        if not pairs:
            raise VerificationError("Glance gave no checksum for the image", retryable=False)
        return next(iter(pairs.items()))

    def to_text(self) -> str:
        """``size:N md5:HEX ALGO:HEX``, the form :meth:`from_text` reads."""
        return " ".join([f"size:{self.size}", *(f"{a}:{v}" for a, v in self.expected().items())])

    @classmethod
    def from_text(cls, text: str | None) -> Digests | None:
        """Read :meth:`to_text`'s form; None when it is not that."""
        pairs = dict(word.partition(":")[::2] for word in (text or "").split())
        size = pairs.pop("size", "")
        if not size.isdigit() or not all(pairs.values()):
            return None
        md5 = pairs.pop("md5", None)
        algo, value = next(iter(pairs.items()), (None, None))
        return cls(size=int(size), md5=md5, hash_algo=algo, hash_value=value)

    def matches(self, other: Digests) -> bool:
        """True when every digest both sides know agrees, and at least one was compared."""
        if self.size != other.size:
            return False
        compared = False
        if self.md5 and other.md5:
            if self.md5 != other.md5:
                return False
            compared = True
        if self.hash_algo and self.hash_algo == other.hash_algo and self.hash_value:
            if self.hash_value != other.hash_value:
                return False
            compared = True
        return compared


class Readable(Protocol):
    """Anything with ``read(size) -> bytes``."""

    def read(self, size: int, /) -> bytes: ...


class VerifyingReader:
    """A file-like reader that hashes what passes through and checks it at the end.

    On a mismatch ``read`` raises instead of returning EOF, so that an HTTP upload fed from
    it is cut off before its last chunk and the server never completes the image.
    """

    def __init__(
        self,
        stream: Readable | BinaryIO,
        expected: Digests,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self._stream: Any = stream
        self._expected = expected
        # one digest is enough on the way: Glance's own hashes are compared once it is done
        algo, digest = expected.cheapest()
        self._check = {algo: digest}
        self._hashes = {algo: hashlib.new(algo)}
        self._on_progress = on_progress
        self.done = 0

    def read(self, size: int = BLOCK) -> bytes:
        """Read and hash up to ``size`` bytes; verify everything at EOF."""
        data: bytes = self._stream.read(size if size and size > 0 else BLOCK)
        if data:
            for h in self._hashes.values():
                h.update(data)
            self.done += len(data)
            if self._on_progress is not None:
                self._on_progress(self.done)
            return data
        self.verify()
        return b""

    def verify(self) -> None:
        """Raise :class:`VerificationError` unless the bytes read are the expected bytes."""
        if self.done != self._expected.size:
            raise VerificationError(
                f"read {self.done} bytes but Glance says the image has {self._expected.size}"
            )
        check_digests(self._check, self._hashes)


def check_digests(expected: Mapping[str, str], hashes: Mapping[str, Any]) -> None:
    """Compare computed hashes with the expected hex digests."""
    for algo, want in expected.items():
        got = hashes[algo].hexdigest()
        if got != want:
            raise VerificationError(f"{algo} of the image bytes is {got}, Glance expects {want}")


def file_digests(path: Path, algos: tuple[str, ...] = ("md5",)) -> dict[str, str]:
    """Hash a whole file with each of ``algos``, each in a thread of its own.

    hashlib lets go of the GIL while it hashes a block, so two algorithms take the time of the
    slower one on two cores, not the sum (md5 + sha512 of a 4 GiB raw disk: ~10 s, not ~19 s).
    """
    if len(algos) == 1:
        return {algos[0]: _hash_file(path, algos[0])}
    with ThreadPoolExecutor(max_workers=len(algos), thread_name_prefix="hash") as pool:
        futures = {algo: pool.submit(_hash_file, path, algo) for algo in algos}
        return {algo: future.result() for algo, future in futures.items()}


def _hash_file(path: Path, algo: str) -> str:
    digest = hashlib.new(algo)
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()
