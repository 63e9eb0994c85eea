"""Hostile payloads for the intake: everything a broken or malicious producer could push.

Used by the tests (tests/test_intake.py, tests/test_hostile_payloads.py) and by
bench/hostile_payloads.py. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
import uuid

from migratio.keys import AMAZON_MIGRATOR, OPENSTACK_MIGRATOR

MiB = 1024 * 1024
CLASSES = (OPENSTACK_MIGRATOR, AMAZON_MIGRATOR)
#: destinations the test settings know (tests/support.py, the sandbox)
KNOWN_SITES = ("site-b", "site-b-api")
#: strings that must never be interpreted by anything
NASTY_STRINGS = (
    "../etc",
    "site-b/../../x",
    "..",
    "$(touch /tmp/pwned)",
    "`id`",
    "a; rm -rf /",
    "x|y",
    "a && b",
    "site-b\x00",
    "\x00",
    "\ud800",
    "\udfff-site",
    "\x1b[31mred",
    "line\nbreak",
    "",
    " ",
    "é" * 300,
    "-rf",
    "--help",
    "%s%n",
    "{0}",
    "site-b ",
)
WRONG_TYPES: tuple[object, ...] = (None, True, 0, -1, 1.5, [], {}, ["a"], {"a": 1}, [[1, 2]])
HUGE_NUMBERS = ("1e400", "-1e400", "9" * 400, "9" * 5000, "1" + "0" * 4299, "NaN", "Infinity")


def valid_job(rng: random.Random, *, jid: bool = True, site: str | None = None) -> bytes:
    """A well-formed migration job as Sidekiq writes it (with or without a jid)."""
    body: dict[str, object] = {
        "retry": True,
        "queue": "migration_site-a",
        "class": rng.choice(CLASSES),
        "args": [str(uuid.UUID(int=rng.getrandbits(128))), site or rng.choice(KNOWN_SITES)],
        "created_at": 1.7e9,
        "enqueued_at": 1.7e9,
    }
    if jid:
        body["jid"] = f"{rng.getrandbits(96):024x}"
    return json.dumps(body, separators=(",", ":")).encode()


def hostile_payload(rng: random.Random, kind: str | None = None) -> bytes:  # noqa: PLR0911, PLR0912
    """One payload that must be refused, of ``kind`` (random when None); see :data:`KINDS`."""
    kind = kind or rng.choice(KINDS)
    image = str(uuid.UUID(int=rng.getrandbits(128)))
    job_class = rng.choice(CLASSES)
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 300))
    if kind == "non-utf8":
        body = json.dumps({"class": job_class, "args": [image, "site-b"]}).encode()
        cut = rng.randint(1, len(body) - 2)
        return (
            body[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]) + body[cut:]
        )
    if kind == "deep":
        depth = rng.choice([17, 100, 1000, 3000, 100_000])
        opener = rng.choice([b"[", b'{"a":'])
        return opener * depth + (b"]" * depth if opener == b"[" else b"1" + b"}" * depth)
    if kind == "huge-number":
        number = rng.choice(HUGE_NUMBERS)
        return (
            f'{{"class":"{job_class}","args":["{image}",{number}],"enqueued_at":{number},'
            f'"jid":{number}}}'
        ).encode()
    if kind == "nul":
        body = json.dumps({"class": job_class, "args": [image, "site-b"]}).encode()
        cut = rng.randint(0, len(body))
        return body[:cut] + b"\x00" + body[cut:]
    if kind == "big":
        size = rng.choice([64 * 1024 + 1, MiB, 5 * MiB])
        return json.dumps({"class": job_class, "args": [image, "x" * size]}).encode()
    if kind == "wrong-type":
        field = rng.choice(["class", "args", "image", "destination", "body"])
        wrong = rng.choice(WRONG_TYPES)
        if field == "body":
            return json.dumps(wrong).encode()
        body = {"class": job_class, "args": [image, "site-b"]}
        if field in ("class", "args"):
            body[field] = wrong
        else:
            body["args"] = [wrong, "site-b"] if field == "image" else [image, wrong]
        return json.dumps(body).encode()
    if kind == "nasty-string":
        nasty = rng.choice(NASTY_STRINGS)
        args = [nasty, "site-b"] if rng.random() < 0.5 else [image, nasty]
        return json.dumps(
            {"class": job_class, "args": args}, ensure_ascii=rng.random() < 0.5
        ).encode("utf-8", "surrogatepass")
    if kind == "unknown-site":
        return json.dumps(
            {"class": job_class, "args": [image, f"nowhere-{rng.randint(0, 9)}"]}
        ).encode()
    if kind == "unknown-class":
        return json.dumps({"class": "Kernel::Exec", "args": [image, "site-b"]}).encode()
    raise ValueError(kind)


KINDS = (
    "bytes",
    "non-utf8",
    "deep",
    "huge-number",
    "nul",
    "big",
    "wrong-type",
    "nasty-string",
    "unknown-site",
    "unknown-class",
)


def hostile_payloads(seed: int, count: int) -> list[bytes]:
    """``count`` payloads that must all be refused: every kind in turn, details at random."""
    rng = random.Random(seed)
    return [hostile_payload(rng, KINDS[i % len(KINDS)]) for i in range(count)]
