"""Runs on the destination host (sent as ``python3 -c``; standard library only).

Feeds a file that rsync is still writing into a command's standard input — the destination's
``glance image-create`` — so that the upload overlaps the transfer instead of following it.
Once the command has succeeded the file is removed: it is in Glance now.

usage: follow_upload.py [--segment-size=BYTES] PATH SIZE ALGO HEXDIGEST IDLE_SECONDS -- COMMAND...

With ``--segment-size`` the file arrives in pieces, each written by its own rsync at once:
``PATH.0`` holds the first BYTES, ``PATH.1`` the next, and so on; they are fed in order.

The command gets EOF only after exactly SIZE bytes whose ALGO digest is HEXDIGEST. In every
other case (a short or wrong file, the local side gone, no growth for IDLE_SECONDS) it is
killed before EOF, so Glance sees a broken upload and never completes an image from bad
bytes. The local side writes ``done`` to our stdin when rsync has finished, and simply goes
away (EOF on our stdin) to abort.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import time

READ = 4 << 20


def main(argv: list[str]) -> int:
    segment = 0
    if argv[1].startswith("--segment-size="):
        segment = int(argv[1].split("=", 1)[1])
        argv = argv[:1] + argv[2:]
    path, size, algo, digest, idle = argv[1], int(argv[2]), argv[3], argv[4], float(argv[5])
    paths = [f"{path}.{k}" for k in range(-(-size // segment))] if segment else [path]
    segment = segment or max(size, 1)
    if argv[6] != "--":
        sys.exit("follow_upload: expected -- before the command")
    child = subprocess.Popen(argv[7:], stdin=subprocess.PIPE)
    pipe = child.stdin
    assert pipe is not None
    hasher = hashlib.new(algo)
    fed = 0
    source = None
    opened = -1
    rsync_done = False
    last_growth = time.monotonic()
    reason = None
    try:
        while fed < size:
            piece = fed // segment
            if piece != opened:
                if source is not None:
                    source.close()
                    source = None
                try:
                    source = open(paths[piece], "rb", buffering=0)  # noqa: SIM115
                    opened = piece
                except FileNotFoundError:
                    source = None
            end = min(size, (piece + 1) * segment)
            chunk = source.read(min(READ, end - fed)) if source is not None else b""
            if chunk:
                hasher.update(chunk)
                pipe.write(chunk)
                fed += len(chunk)
                last_growth = time.monotonic()
                continue
            if child.poll() is not None:
                reason = "the upload command exited early"
                break
            if rsync_done:
                reason = "the transferred file is %d bytes, expected %d" % (fed, size)
                break
            if time.monotonic() - last_growth > idle:
                reason = f"the file stopped growing for {idle:.0f} s"
                break
            ready, _, _ = select.select([0], [], [], 0.1)
            if ready:
                message = os.read(0, 64)
                if not message:
                    reason = "the migrating side went away"
                    break
                if b"done" in message:
                    rsync_done = True
        if reason is None and hasher.hexdigest() != digest:
            reason = f"{algo} of the transferred file is {hasher.hexdigest()}, expected {digest}"
    except BrokenPipeError:
        reason = "the upload command stopped reading"
    if reason is not None:
        child.kill()
        child.wait()
        sys.stderr.write(f"follow_upload: aborted: {reason}\n")
        return 3
    pipe.close()
    code = child.wait()
    if code == 0:
        for done in paths:
            os.remove(done)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
