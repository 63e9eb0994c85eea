"""Runs on the destination host (sent as ``python3 -c``; standard library only, Python 3.6+).

ASCII only: a Python 3.6 in the C locale (an SSH session without LANG) cannot even decode
a ``-c`` program that is not.

Feeds a file that rsync is still writing into a command's standard input -- the destination's
``glance image-create`` -- so that the upload overlaps the transfer instead of following it.
Once the command has succeeded the file is removed: it is in Glance now.

usage: follow_upload.py [--segment-size=BYTES] [--http-fields=JSON]
                        PATH SIZE ALGO HEXDIGEST IDLE_SECONDS -- COMMAND...
       follow_upload.py --check [--http]   (prints the Python version and, with --http, the
                                           way it would upload; makes nothing)
       follow_upload.py --find KEY=VALUE...  (prints ``images JSON``: the images whose
                                           properties equal these, from Glance's API; or
                                           ``unsupported WHY``: ask the CLI)

With ``--segment-size`` the file arrives in pieces, each written by its own rsync at once:
``PATH.0`` holds the first BYTES, ``PATH.1`` the next, and so on; they are fed in order.

With ``--http-fields`` (the image's fields, as Glance's API takes them) the helper talks to
Glance's API itself when the environment's credentials allow it (see :func:`glance_access`):
it creates the record, PUTs the file with ``Content-Length`` as it arrives, holding back the
last byte until the size and digest are right, and prints ``created JSON`` and, at the end,
``image JSON``. The ``glance`` CLI pipes the data with chunked encoding through a Python of
its own, which costs the destination about twice the CPU. Any other credentials (a clouds.yaml,
an application credential, a proxy...), and Keystone refusing them, fall back to
COMMAND, which is then run as described below; the line ``upload via ...`` says which way.
Glance never completes an image from a body shorter than its ``Content-Length``: however this
helper ends before the last byte, the connection closes short and the image stays ``queued``.

The command gets EOF only after exactly SIZE bytes whose ALGO digest is HEXDIGEST, and only
once the local side has said ``done`` and is still connected; in every other case it is killed
first, so Glance sees a broken upload and never completes an image.
That holds however this helper ends, because EOF on a pipe needs every writer gone:

- this process (the feeder) writes the bytes into the command's stdin pipe;
- a guard, forked from it, holds a second write end of that pipe and is the command's parent
  (the command dies with it: ``PR_SET_PDEATHSIG``). It lets go of its write end only when the
  feeder says ``release`` after checking size and digest. If the feeder ends any other way --
  SIGTERM, SIGKILL, an exception, the SSH connection dropping -- the guard sees its lifeline
  close, kills the command and only then lets go: the command never sees EOF;
- if the guard itself is killed, the command dies with it while the feeder still holds its
  write end.

The local side writes ``done`` to our stdin when rsync has finished, and simply goes away (EOF
on our stdin) to abort.
"""

import contextlib
import ctypes
import fcntl
import hashlib
import http.client
import json
import os
import queue
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Tuple

READ = 1 << 20
#: the pipe into the command holds this much (fcntl F_SETPIPE_SZ; the default is 64 KiB),
#: so that the command and this feeder are not woken for every 64 KiB
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
PR_SET_PDEATHSIG = 1
ABORTED = 3


class Hasher:
    """A digest computed in a thread of its own (hashlib lets go of the GIL), so that
    hashing a chunk overlaps writing the next one into the pipe."""

    def __init__(self, algo: str) -> None:
        self.hash = hashlib.new(algo)
        self.chunks = queue.Queue(maxsize=16)  # type: queue.Queue[Optional[bytes]]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            chunk = self.chunks.get()
            if chunk is None:
                return
            self.hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.chunks.put(chunk)

    def hexdigest(self) -> str:
        self.chunks.put(None)
        self.thread.join()
        return self.hash.hexdigest()


class Abort(Exception):
    """End the upload without letting the command complete it."""


def die_with(parent: int) -> None:
    """In the command, before exec: SIGKILL when ``parent`` (the guard) dies."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the guard's kill remains
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the guard died before prctl took effect
        os._exit(ABORTED)


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def guard(command: List[str], data_r: int, data_w: int, life_r: int) -> None:
    """The guard process: run the command, hold its stdin open until released; never returns."""
    me = os.getpid()
    child = subprocess.Popen(  # the guard has no threads
        command,
        stdin=data_r,
        preexec_fn=lambda: die_with(me),  # noqa: PLW1509
    )
    os.close(data_r)

    def stop(*_args: object) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            # it may have ended first (why the feeder gave up): its pipe closes a moment
            # before it can be reaped; meanwhile this guard's write end keeps EOF from it
            child.wait(timeout=0.5)
            say_how_it_ended(command[0], child.returncode)
        child.kill()
        child.wait()
        os._exit(ABORTED)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)
    while child.poll() is None:
        ready, _, _ = select.select([life_r], [], [], 0.5)
        if not ready:
            continue
        message = os.read(life_r, 64)
        if not message:
            stop()  # the feeder is gone without a release: the command must not finish
        if message.startswith(b"release"):
            os.close(data_w)  # the command sees EOF once the feeder has closed its end too
            os.close(life_r)
            for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(signum, signal.SIG_IGN)  # the bytes are right: let it finish
            child.wait()
            break
    else:
        say_how_it_ended(command[0], child.returncode)  # before it had all the bytes
    code = child.returncode
    os._exit(code if code >= 0 else 128 - code)


def say_how_it_ended(program: str, returncode: int) -> None:
    """Tell the migrating side that the upload command ended before it was released."""
    how = "killed by signal %d" % -returncode if returncode < 0 else "exit %d" % returncode
    with contextlib.suppress(OSError):
        sys.stderr.write(
            "follow_upload: %s ended before the upload was complete (%s)\n"
            % (os.path.basename(program), how)
        )
        sys.stderr.flush()


def interrupted(signum: int, _frame: object) -> None:
    raise Abort("stopped by signal %d" % signum)


def running(pid: int) -> bool:
    """Whether the child ``pid`` has not exited yet (without reaping it)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def main(argv: List[str]) -> int:
    if argv[1:2] == ["--check"]:
        check(http="--http" in argv[2:])
        return 0
    if argv[1:2] == ["--find"]:
        find(argv[2:])
        return 0
    segment = 0
    fields = None  # type: Optional[Dict[str, Any]]
    while argv[1].startswith(("--segment-size=", "--http-fields=")):  # PATH may start with --
        option, _, value = argv[1].partition("=")
        if option == "--segment-size":
            segment = int(value)
        else:
            fields = json.loads(value)
        argv = argv[:1] + argv[2:]
    path, size, algo, digest, idle = argv[1], int(argv[2]), argv[3], argv[4], float(argv[5])
    if argv[6] != "--":
        sys.exit("follow_upload: expected -- before the command")
    arrival = Arrival(path, segment, size, algo, digest, idle)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    if fields is not None:
        try:
            if size == 0:  # Content-Length: 0 is a whole body: nothing could be held back
                raise Unsupported("an empty file")
            access = glance_access(os.environ)
        except Unsupported as exc:
            say("upload via cli (%s)" % exc)
        else:
            say("upload via http")
            return upload_over_http(access, fields, arrival)
    return upload_with_command(argv[7:], arrival)


def check(http: bool) -> None:
    """Print the Python version and, with ``http``, which way the upload would go (this asks
    Keystone for a token; nothing is made)."""
    way = ""
    if http:
        try:
            way = "; uploads through Glance's API at %s" % glance_access(os.environ).endpoint
        except Unsupported as exc:
            way = "; uploads with the glance CLI (%s)" % exc
    say("follow_upload ready on Python %d.%d.%d%s" % (*sys.version_info[:3], way))


def find(filters: List[str]) -> None:
    """Print ``images JSON``, every image there whose properties equal ``filters``
    (``KEY=VALUE``), as Glance's API lists them (what ``glance image-list --property-filter``
    asks, without the CLI's start-up and an ``image-show`` for each); or ``unsupported WHY``
    when the credentials are for the CLI, or Glance did not answer as expected."""
    images = []  # type: List[Any]
    try:
        access = glance_access(os.environ)
        query = [f.partition("=")[::2] for f in filters] + [("limit", "100")]
        url = access.image_url() + "?" + urllib.parse.urlencode(query)
        seen = set()
        while url:
            if url in seen:  # a copy on a page never read would look absent
                raise Unsupported("Glance gave the same next page twice: %s" % url)
            seen.add(url)
            status, _, answer = access.call("GET", url)
            if status != 200:
                raise Unsupported("Glance answered HTTP %d: %s" % (status, excerpt(answer)))
            page = json.loads(answer.decode())
            if not isinstance(page, dict) or not isinstance(page.get("images"), list):
                raise Unsupported("Glance answered no list: %s" % excerpt(answer))
            images.extend(page["images"])
            following = page.get("next")
            url = access.endpoint + following if isinstance(following, str) else ""
    except Unsupported as exc:
        say("unsupported %s" % exc)
        return
    except (OSError, http.client.HTTPException, ValueError) as exc:
        say("unsupported %s: %s" % (type(exc).__name__, exc))
        return
    say("images " + json.dumps(images))


def say(line: str) -> None:
    """A line to the migrating side, in ASCII (Python 3.6 in the C locale has no other)."""
    sys.stdout.write(line.encode("ascii", "backslashreplace").decode("ascii") + "\n")
    sys.stdout.flush()


def upload_with_command(command: List[str], arrival: "Arrival") -> int:
    """Feed the file into ``command`` (the ``glance image-create`` that reads stdin)."""
    data_r, data_w = os.pipe()
    with contextlib.suppress(OSError):  # not Linux, or a lower pipe-max-size: as it is
        fcntl.fcntl(data_w, F_SETPIPE_SZ, PIPE_SIZE)
    life_r, life_w = os.pipe()
    guard_pid = os.fork()
    if guard_pid == 0:
        try:
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            os.close(life_w)
            guard(command, data_r, data_w, life_r)
        finally:
            os._exit(ABORTED)
    os.close(data_r)
    os.close(life_r)
    sink = Pipe(data_w, guard_pid)
    try:
        # the hasher's thread starts after the fork: the guard has no threads
        feed_all(arrival, sink)
        os.write(life_w, b"release")
    except BaseException as exc:
        os.close(life_w)  # the guard kills the command before its stdin can close
        os.waitpid(guard_pid, 0)
        return aborted(exc)
    os.close(data_w)
    code = exit_code(os.waitpid(guard_pid, 0)[1])
    if code == 0:
        arrival.remove()
    return code


def aborted(exc: BaseException) -> int:
    reason = str(exc) if isinstance(exc, Abort) else "%s: %s" % (type(exc).__name__, exc)
    with contextlib.suppress(OSError):  # the connection may be gone
        sys.stderr.write("follow_upload: aborted: %s\n" % reason)
        sys.stderr.flush()
    return ABORTED


class Arrival:
    """The file rsync is writing here: where (``path``, or its pieces ``path.0``, ``.1``... of
    ``segment`` bytes each), how big it will be, what it must hash to, and how long it may
    stop growing."""

    def __init__(
        self, path: str, segment: int, size: int, algo: str, digest: str, idle: float
    ) -> None:
        self.paths = (
            ["%s.%d" % (path, k) for k in range(-(-size // segment))] if segment else [path]
        )
        self.segment = segment or max(size, 1)
        self.size = size
        self.algo = algo
        self.digest = digest
        self.idle = idle

    def remove(self) -> None:
        """Once the upload is complete: the file is in Glance now."""
        for done in self.paths:
            with contextlib.suppress(FileNotFoundError):  # removed already
                os.remove(done)


class Pipe:
    """The command's stdin: where :func:`feed` writes when the ``glance`` CLI uploads."""

    def __init__(self, fd: int, guard: int) -> None:
        self.fd = fd
        self.guard = guard

    def write(self, chunk: bytes) -> None:
        try:
            write_all(self.fd, chunk)
        except BrokenPipeError:
            raise Abort("the upload command stopped reading") from None

    def check(self) -> None:
        if not running(self.guard):
            raise Abort("the upload command exited early")


def feed_all(arrival: Arrival, sink: "Pipe | Put") -> None:
    """Feed the whole file to ``sink``; return only when its size and digest are right, the
    migrating side has said ``done`` and is still there -- then, with SIGTERM, SIGHUP and
    SIGINT ignored, the caller lets the upload complete. :class:`Abort` otherwise."""
    hasher = Hasher(arrival.algo)
    if not feed(arrival, hasher, sink):
        wait_for_done(arrival.idle, sink)
    got, algo = hasher.hexdigest(), arrival.algo
    if got != arrival.digest:
        raise Abort("%s of the transferred file is %s, expected %s" % (algo, got, arrival.digest))
    if gone():
        raise Abort("the migrating side went away")
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)  # the bytes are right: the image may complete


def feed(arrival: Arrival, hasher: Hasher, sink: "Pipe | Put") -> bool:
    """Write the file's bytes to ``sink`` as rsync writes them; :class:`Abort` otherwise.
    Whether the migrating side has said ``done`` on the way."""
    paths, segment, size, idle = arrival.paths, arrival.segment, arrival.size, arrival.idle
    fed = 0
    source: Optional[int] = None
    opened = -1
    rsync_done = False
    last_growth = time.monotonic()
    while fed < size:
        piece = fed // segment
        if piece != opened:
            if source is not None:
                os.close(source)
                source = None
            try:
                source = os.open(paths[piece], os.O_RDONLY)
                opened = piece
            except FileNotFoundError:
                source = None
        end = min(size, (piece + 1) * segment)
        chunk = os.read(source, min(READ, end - fed)) if source is not None else b""
        if chunk:
            hasher.update(chunk)
            sink.write(chunk)
            fed += len(chunk)
            last_growth = time.monotonic()
            continue
        sink.check()
        if rsync_done:
            raise Abort("the transferred file is %d bytes, expected %d" % (fed, size))
        if time.monotonic() - last_growth > idle:
            raise Abort("the file stopped growing for %.0f s" % idle)
        if heard_done(0.1):
            rsync_done = True
    return rsync_done


def heard_done(seconds: float) -> bool:
    """Whether the migrating side said ``done`` within ``seconds``; :class:`Abort` if it went
    away (EOF on our stdin)."""
    ready, _, _ = select.select([0], [], [], seconds)
    if not ready:
        return False
    message = os.read(0, 64)
    if not message:
        raise Abort("the migrating side went away")
    return b"done" in message


def wait_for_done(idle: float, sink: "Pipe | Put") -> None:
    """Wait for the migrating side's ``done``; :class:`Abort` if it went away.

    The whole file may be there before the migrating side says so (a re-run finds it, or
    the upload lags behind the transfer). If that side was killed meanwhile, its next
    attempt may already be looking for a copy, or uploading its own: a helper left
    behind must not complete a second image.
    """
    deadline = time.monotonic() + idle
    while time.monotonic() < deadline:
        sink.check()
        if heard_done(0.1):
            return
    raise Abort("the migrating side did not confirm the transfer for %.0f s" % idle)


def gone() -> bool:
    """Whether our stdin -- the SSH channel from the migrating side -- has reached its end.

    Asked last, just before the command may complete the image: by then the command has
    made the image's record, so an attempt that starts after the migrating side died
    finds that record (and deletes it, or takes the finished copy) -- never no copy.
    """
    while True:
        ready, _, _ = select.select([0], [], [], 0)
        if not ready:
            return False
        if not os.read(0, 64):
            return True


# --- the upload over Glance's API ------------------------------------------------------------

#: seconds one HTTP request (not the upload's body) may take
HTTP_TIMEOUT = 60
#: seconds Glance may take none of the upload's body, or take to answer it (the CLI's 600)
SEND_TIMEOUT = 600
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")
_VERSION = re.compile(r"/v\d+(\.\d+)?/?$")


class Unsupported(Exception):
    """These credentials are for the ``glance`` CLI: the helper cannot use them itself."""


class Access:
    """Where Glance's API is, the headers that authenticate to it, and how TLS is checked."""

    def __init__(self, endpoint: str, token: str, tls: Optional[ssl.SSLContext]) -> None:
        self.endpoint = _VERSION.sub("", endpoint.rstrip("/"))
        self.headers = {"X-Auth-Token": token, "User-Agent": "migratio"}
        self.tls = tls

    def connect(self, url: str, timeout: float = HTTP_TIMEOUT) -> http.client.HTTPConnection:
        return connect(url, self.tls, timeout)

    def image_url(self, image_id: str = "") -> str:
        return (
            self.endpoint
            + "/v2/images"
            + ("/" + urllib.parse.quote(image_id, safe="") if image_id else "")
        )

    def call(
        self, method: str, url: str, body: Any = None, timeout: float = HTTP_TIMEOUT
    ) -> Tuple[int, Mapping[str, str], bytes]:
        return call(self.connect(url, timeout), method, url, dict(self.headers), body)

    def json(self, method: str, url: str, body: Any, want: int, doing: str) -> Dict[str, Any]:
        """The JSON object Glance answered with (status ``want``); :class:`Abort` otherwise."""
        try:
            status, _, answer = self.call(method, url, body)
        except (OSError, http.client.HTTPException) as exc:
            raise Abort("%s: %s: %s" % (doing, type(exc).__name__, exc)) from None
        if status != want:
            raise Abort("%s: Glance answered HTTP %d: %s" % (doing, status, excerpt(answer)))
        try:
            record = json.loads(answer.decode())
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise Abort("%s: Glance answered no image: %s" % (doing, excerpt(answer)))
        return record


def raw_answer(answer: bytes) -> str:
    """``HTTP 413: <body>`` from the start of an HTTP response as it came off the socket."""
    head, _, body = answer.partition(b"\r\n\r\n")
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    status = words[1] if len(words) > 1 and words[0].startswith("HTTP/") else "?"
    return "HTTP %s: %s" % (status, excerpt(body if status != "?" else answer))


def excerpt(answer: bytes) -> str:
    """Glance's answer, on one line, not too long (an error page can be HTML)."""
    text = " ".join(answer.decode("utf-8", "replace").split())
    return text[:300] + ("..." if len(text) > 300 else "")


def connect(
    url: str, tls: Optional[ssl.SSLContext], timeout: float = HTTP_TIMEOUT
) -> http.client.HTTPConnection:
    """A connection to ``url``'s host, with ``tls`` for https."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=tls
        )
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def call(
    conn: http.client.HTTPConnection,
    method: str,
    url: str,
    headers: Dict[str, str],
    body: Any = None,
) -> Tuple[int, Mapping[str, str], bytes]:
    """One request, JSON ``body`` (or none); the status, headers and body of the answer."""
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        path = urllib.parse.urlsplit(url)
        conn.request(method, path.path + ("?" + path.query if path.query else ""), data, headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def plain(text: str) -> bool:
    """Whether ``text`` can go into an HTTP header or request line as it is."""
    return not any(ord(c) < 32 or ord(c) == 127 for c in text)


def truthy(text: Optional[str]) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def tls_context(env: Mapping[str, str]) -> ssl.SSLContext:
    """TLS as the CLI checks it: OS_CACERT, or the system's; OS_INSECURE: not checked."""
    if truthy(env.get("OS_INSECURE")):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=env.get("OS_CACERT") or None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise Unsupported("OS_CACERT %s cannot be used: %s" % (env.get("OS_CACERT"), exc)) from None


def glance_access(env: Mapping[str, str]) -> Access:
    """The destination's Glance, as its ``glance`` CLI would reach it with ``env``.

    Two kinds of credentials are understood: a token with the image endpoint (``OS_AUTH_TOKEN``
    or ``OS_TOKEN`` with ``OS_IMAGE_URL``), and a Keystone v3 password (``OS_AUTH_URL``,
    ``OS_USERNAME`` or ``OS_USER_ID``, ``OS_PASSWORD``, a project and the domains), whose
    token's catalog gives the ``image`` endpoint of ``OS_INTERFACE`` (``OS_ENDPOINT_TYPE``;
    public) in ``OS_REGION_NAME``, unless ``OS_IMAGE_URL`` says where it is. Anything else
    raises :class:`Unsupported`: the CLI knows more ways (other plugins, client certificates,
    Keystone v2.0, proxies), and a password Keystone refuses is for the CLI to report.
    """
    for name in PROXY_VARIABLES:
        if env.get(name) or env.get(name.upper()):
            raise Unsupported("a proxy is set in %s" % name)
    for name in ("OS_CERT", "OS_KEY"):
        if env.get(name):
            raise Unsupported("%s is set" % name)
    tls = tls_context(env)
    token = (env.get("OS_AUTH_TOKEN") or env.get("OS_TOKEN") or "").strip()
    image_url = (env.get("OS_IMAGE_URL") or "").strip()
    if not plain(token) or not plain(image_url):  # e.g. a ~/.creds with CRLF line ends
        raise Unsupported("OS_AUTH_TOKEN, OS_TOKEN or OS_IMAGE_URL has a control character")
    if token and image_url:
        return Access(image_url, token, tls)
    auth_type = env.get("OS_AUTH_TYPE") or "password"
    if auth_type not in ("password", "v3password"):
        raise Unsupported("OS_AUTH_TYPE is %s" % auth_type)
    auth_url = (env.get("OS_AUTH_URL") or "").rstrip("/")
    if not auth_url or not env.get("OS_PASSWORD"):
        raise Unsupported("no OS_AUTH_URL with OS_PASSWORD")
    if env.get("OS_IDENTITY_API_VERSION", "3").startswith("2") or auth_url.endswith("/v2.0"):
        raise Unsupported("Keystone v2.0")
    if not auth_url.endswith("/v3"):
        auth_url += "/v3"
    token, catalog = keystone_token(auth_url, env, tls)
    return Access(image_url or image_endpoint(catalog, env), token, tls)


def named(env: Mapping[str, str], prefixes: str) -> Optional[Dict[str, str]]:
    """``{"id": ...}`` or ``{"name": ...}`` from the first ``OS_<PREFIX>_ID`` or
    ``OS_<PREFIX>_NAME`` set, ids first, prefixes in order (None: none is set)."""
    for prefix in prefixes.split():
        for key in ("ID", "NAME"):
            if env.get("OS_%s_%s" % (prefix, key)):
                return {key.lower(): env["OS_%s_%s" % (prefix, key)]}
    return None


def domain(env: Mapping[str, str], prefix: str) -> Dict[str, str]:
    """The domain of the user or project: its own, the default one named in ``env``, or the
    one named ``Default`` (as migratio's own Keystone client takes it, for the original's
    ``~/.creds``, which named none)."""
    return named(env, prefix + " DEFAULT_DOMAIN") or {"name": "Default"}


def keystone_token(
    auth_url: str, env: Mapping[str, str], tls: ssl.SSLContext
) -> Tuple[str, List[Any]]:
    """A project-scoped token from Keystone v3 for the password in ``env``, and its catalog."""
    if env.get("OS_USER_ID"):
        user = {"id": env["OS_USER_ID"]}  # type: Dict[str, Any]
    elif env.get("OS_USERNAME"):
        user = {"name": env["OS_USERNAME"]}
    else:
        raise Unsupported("no OS_USERNAME")
    if "name" in user:
        user["domain"] = domain(env, "USER_DOMAIN")
    user["password"] = env["OS_PASSWORD"]
    project = named(env, "PROJECT TENANT")  # type: Optional[Dict[str, Any]]
    if project is None:
        raise Unsupported("no OS_PROJECT_NAME or OS_PROJECT_ID")
    if "name" in project:
        project["domain"] = domain(env, "PROJECT_DOMAIN")
    body = {
        "auth": {
            "identity": {"methods": ["password"], "password": {"user": user}},
            "scope": {"project": project},
        }
    }
    url = auth_url + "/auth/tokens"
    try:
        status, headers, answer = call(
            connect(url, tls), "POST", url, {"User-Agent": "migratio"}, body
        )
    except (OSError, http.client.HTTPException) as exc:
        raise Unsupported("Keystone at %s: %s" % (auth_url, exc)) from None
    token = {k.lower(): v for k, v in headers.items()}.get("x-subject-token")
    if status != 201 or not token or not plain(token):
        raise Unsupported("Keystone at %s answered HTTP %d" % (auth_url, status))
    try:
        catalog = json.loads(answer.decode())["token"].get("catalog") or []
    except (ValueError, KeyError, AttributeError):
        raise Unsupported("Keystone at %s answered no token" % auth_url) from None
    return token, catalog


def image_endpoint(catalog: List[Any], env: Mapping[str, str]) -> str:
    """The ``image`` endpoint of the interface and region the CLI would take."""
    interface = env.get("OS_INTERFACE") or env.get("OS_ENDPOINT_TYPE") or "public"
    if interface.endswith("URL"):
        interface = interface[: -len("URL")]
    region = env.get("OS_REGION_NAME")
    for service in catalog:
        if not isinstance(service, dict) or service.get("type") != "image":
            continue
        for endpoint in service.get("endpoints") or []:
            if (
                isinstance(endpoint, dict)
                and endpoint.get("interface") == interface
                and (not region or region in (endpoint.get("region"), endpoint.get("region_id")))
                and isinstance(endpoint.get("url"), str)
            ):
                return str(endpoint["url"])
    raise Unsupported(
        "no %s image endpoint%s in the catalog"
        % (interface, " in region " + region if region else "")
    )


def upload_over_http(access: Access, fields: Dict[str, Any], arrival: Arrival) -> int:
    """Create the image with ``fields`` and PUT the file into it as it arrives."""
    record = None  # type: Optional[Dict[str, Any]]
    put = None  # type: Optional[Put]
    try:
        record = access.json("POST", access.image_url(), fields, 201, "creating the image")
        say("created " + json.dumps(record))
        put = Put(access, str(record["id"]), arrival.size)
        feed_all(arrival, put)
        put.finish()
    except BaseException as exc:
        if put is not None:
            put.close()  # before the last byte: Glance keeps nothing of it
        if record is not None:
            forget(access, str(record["id"]))
        return aborted(exc)
    arrival.remove()
    url = access.image_url(str(record["id"]))
    with contextlib.suppress(Abort, OSError):  # the migrating side then reads it back itself
        say("image " + json.dumps(access.json("GET", url, None, 200, "reading it back")))
    return 0


def forget(access: Access, image_id: str) -> None:
    """Delete the record this helper made (it never got its last byte): best effort, the
    migrating side and the sweep delete what is left."""
    with contextlib.suppress(Exception):
        access.call("DELETE", access.image_url(image_id), timeout=10)


class Put:
    """Glance's ``PUT /v2/images/ID/file`` with ``Content-Length``, where :func:`feed` writes
    when the helper uploads itself. The last byte is held back until :meth:`finish`: until
    then, however the helper ends, Glance sees a short body and completes no image."""

    def __init__(self, access: Access, image_id: str, size: int) -> None:
        url = access.image_url(image_id) + "/file"
        self.conn = access.connect(url, timeout=SEND_TIMEOUT)
        self.conn.putrequest("PUT", urllib.parse.urlsplit(url).path, skip_accept_encoding=True)
        for name, value in access.headers.items():
            self.conn.putheader(name, value)
        self.conn.putheader("Content-Type", "application/octet-stream")
        self.conn.putheader("Content-Length", str(size))
        self.conn.endheaders()
        self.size = size
        self.sent = 0
        self.last = b""

    @property
    def sock(self) -> Any:
        assert self.conn.sock is not None
        return self.conn.sock

    def write(self, chunk: bytes) -> None:
        if chunk and self.sent + len(chunk) == self.size:
            chunk, self.last = chunk[:-1], chunk[-1:]
        try:
            self.sock.sendall(chunk)
        except socket.timeout:  # noqa: UP041 (not yet TimeoutError on Python 3.6 to 3.9)
            raise Abort(
                "Glance took none of the data for %d s, after %d of %d bytes"
                % (SEND_TIMEOUT, self.sent, self.size)
            ) from None
        except OSError as exc:
            self.check()  # what Glance said before it stopped reading, if it said anything
            raise Abort(
                "the upload's connection to Glance broke after %d of %d bytes (%s)"
                % (self.sent, self.size, exc)
            ) from None
        self.sent += len(chunk)

    def check(self) -> None:
        """:class:`Abort` if Glance answered (or closed) before it had all the data."""
        if not select.select([self.sock], [], [], 0)[0]:
            return
        self.sock.setblocking(False)
        try:
            answer = self.sock.recv(1 << 16)
        except (ssl.SSLWantReadError, BlockingIOError):
            return  # TLS 1.3 session tickets, read now: no answer from Glance
        except OSError as exc:
            answer = ("(%s)" % exc).encode()
        finally:
            self.sock.settimeout(SEND_TIMEOUT)
        if not answer:
            raise Abort(
                "Glance closed the upload's connection after %d of %d bytes"
                % (self.sent, self.size)
            )
        raise Abort(
            "Glance answered %s after %d of %d bytes" % (raw_answer(answer), self.sent, self.size)
        )

    def finish(self) -> None:
        """Send the last byte; :class:`Abort` unless Glance took the data."""
        try:
            self.sock.sendall(self.last)
            self.sock.settimeout(SEND_TIMEOUT)  # Glance may still be storing it
            response = self.conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Abort("uploading the data: %s: %s" % (type(exc).__name__, exc)) from None
        finally:
            self.conn.close()
        if response.status >= 300:
            raise Abort(
                "uploading the data: Glance answered HTTP %d: %s"
                % (response.status, excerpt(answer))
            )

    def close(self) -> None:
        self.conn.close()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
