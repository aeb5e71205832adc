"""`laionfilter rate`: a local page for rating images, 1–N stars or pairwise, where nothing is lost.

The server is the standard library's ThreadingHTTPServer on 127.0.0.1. The page (``web/``: plain HTML,
CSS and JS, no build step, no CDN) asks for the next image or pair, and posts each answer. An answer
is appended to the output CSV whole and flushed to disk (fsync) before the server acknowledges it; a
write that fails (a full disk) is cut back to the last whole row and the page shows the error. So a
closed tab, Ctrl-C or a killed process loses at most the answer in flight; a rerun of the same command
reads the file back and shows nothing that was already answered. Undo rewrites the file atomically.

Images are addressed by their index in the list the server built (``/image/17``), never by a path
from the browser, so no URL can reach a file outside SOURCE. The server answers its own page only: a
request must name it in ``Host`` (so a rebound DNS name is refused), a POST from a browser must come
from its origin and carry JSON (so another site's page cannot post answers), and a body is at most
``MAX_BODY`` bytes of a documented shape.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import shlex
import signal
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import LaionfilterError
from .log import note
from .names import check_name
from .safefiles import atomic_write
from .tables import answers_writer

WEB = Path(__file__).parent / "web"
STATIC = {"rate.js": "text/javascript", "rate.css": "text/css"}
MODES = {"stars": ["image", "score"], "pairs": ["image_a", "image_b", "winner"]}
WINNERS = ("a", "b", "tie")
MAX_BODY = 4096  # bytes: the largest answer the page sends is some 60
_IMAGE_PATH = re.compile(r"/image/([0-9]{1,9})")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(ValueError):
    """A request the API does not take: answered with 400 (or ``status``) and its reason, never a traceback."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class Item:
    """One image: how it is named in the output (a path relative to the output, or a shard key) and its bytes."""

    label: str
    load: Callable[[], bytes]


def collect_images(source: str, from_scores: str | None = None, out: Path | None = None,
                   allow_pipe: bool = False) -> list[Item]:
    """The images of SOURCE: a folder (recursively), a glob, or WebDataset shards (sample keys; ``pipe:``
    URLs run only with ``allow_pipe``)."""
    from .shards import IMAGE_SUFFIXES, expand_shards, find_images

    base = (out.parent if out else Path.cwd()).resolve()

    def file_item(p: Path) -> Item:
        label = os.path.relpath(p, base) if os.path.commonpath([p, base]) == str(base) else str(p)
        return Item(label, p.read_bytes)

    found = find_images(source)
    if found is not None:
        root, files = found
        items = [file_item(root / f) for f in files]
    else:
        from .reader import Sample, read_shard

        items = []
        for url in expand_shards(source, allow_pipe):
            for s in read_shard(url):
                if isinstance(s, Sample) and s.image is not None:
                    items.append(Item(s.key, (lambda data: lambda: data)(s.image[1])))
    if not items:
        raise LaionfilterError(f"{source}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)} files or shards)")
    if from_scores:
        items = spread_by_score(items, from_scores)
    return items


def spread_by_score(items: list[Item], scores: str) -> list[Item]:
    """Items ordered so that any prefix covers the scores' whole range (low, high, middle, ...), not the top."""
    from .query import connect, profile_columns, quote, run_sql

    con = connect(scores)
    cols = profile_columns(con)
    if not cols:
        raise LaionfilterError(f"{scores}: no score columns")
    t = run_sql(con, f"SELECT key, {quote(cols[0])} AS s FROM scores WHERE status = 'ok' AND s IS NOT NULL")
    score = dict(zip(t.column("key").to_pylist(), t.column("s").to_pylist()))
    known = sorted((score[i.label], i) for i in items if i.label in score) if score else []
    if not known:
        raise LaionfilterError(f"{scores}: none of the images to rate has a score there (keys must match)")
    ranked = [i for _, i in known]
    order, step, seen = [], len(ranked), set()
    while step >= 1:  # 0, n, n/2, n/4, 3n/4, ...: every prefix spans the range evenly
        for k in range(0, len(ranked), step):
            if k not in seen:
                seen.add(k)
                order.append(ranked[k])
        step //= 2
    return order + [i for i in items if i.label not in score]


@dataclass
class Session:
    """The state of one rating run: the images, what the output file already holds, what comes next."""

    out: Path
    items: list[Item]
    mode: str = "stars"
    scale: int = 10
    target: int = 20
    user: str | None = None
    seed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    rows: list[list[str]] = field(default_factory=list)
    skipped: set = field(default_factory=set)
    skipped_images: set = field(default_factory=set)
    order_hint: list[int] | None = None  # items in this order first (rate --order active), the rest shuffled
    learn_command: str | None = None  # what the page says to run once done (None: as for image files)

    def __post_init__(self):
        if self.mode not in MODES:
            raise LaionfilterError(f"--mode must be stars or pairs, not {self.mode!r}")
        if self.user is not None:
            check_name(self.user, "user")
        self.header = MODES[self.mode] + (["user"] if self.user else [])
        self.index = {it.label: i for i, it in enumerate(self.items)}
        self.rows = self._read_existing()
        self._check_writable()
        rest = [i for i in range(len(self.items)) if i not in set(self.order_hint or [])]
        random.Random(self.seed).shuffle(rest)
        self.order = list(self.order_hint or []) + rest
        self.unreadable: dict[str, str] = {}

    def _pairs(self):
        """Each image meets the next ones in a shuffled ring: every image early, no pair twice."""
        n = len(self.order)
        for d in range(1, n // 2 + 1):
            for i in range(n if 2 * d < n else n // 2):
                yield self.order[i], self.order[(i + d) % n]

    # -- the file -----------------------------------------------------------------------------------

    def _read_existing(self) -> list[list[str]]:
        if not self.out.exists():
            return []
        with open(self.out, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            return []
        if rows[0][:len(MODES[self.mode])] != MODES[self.mode]:
            other = next((m for m, cols in MODES.items() if rows[0][:len(cols)] == cols), None)
            raise LaionfilterError(f"{self.out}: holds {'a ' + other + ' file' if other else 'another format'} "
                                   f"(header {','.join(rows[0])}), not {self.mode}; choose another --out or --mode")
        self.header = rows[0]
        return rows[1:]

    def _check_writable(self) -> None:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with open(self.out, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise LaionfilterError(f"{self.out}: cannot write answers there ({e.strerror})") from None

    def _append(self, row: list[str]) -> None:
        """Add one row whole, on disk (fsync) before the answer is acknowledged, or not at all."""
        fd = os.open(self.out, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            size = os.fstat(fd).st_size
            buf = io.StringIO()
            if size == 0:
                answers_writer(buf).writerow(self.header)
            elif os.pread(fd, 1, size - 1) != b"\n":
                buf.write("\n")  # a last line without its end (a file edited by hand): the row starts on its own
            answers_writer(buf).writerow(row)
            data = memoryview(buf.getvalue().encode("utf-8"))
            try:
                while data:
                    data = data[os.write(fd, data):]  # a full disk can take part of a row before it fails
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # back to the last whole row: the next answer never lands on a fragment
                raise
        finally:
            os.close(fd)
        self.rows.append(row)

    # -- what comes next ----------------------------------------------------------------------------

    def _done_images(self) -> set[str]:
        return {r[0] for r in self.rows}

    def _done_pairs(self) -> set[frozenset]:
        return {frozenset(r[:2]) for r in self.rows}

    def next_item(self) -> dict[str, Any] | None:
        if self.mode == "stars":
            done = self._done_images()
            i = next((i for i in self.order if self.items[i].label not in done and i not in self.skipped), None)
            return None if i is None else {"item": i, "label": self.items[i].label}
        done = self._done_pairs()
        for a, b in self._pairs():
            key = frozenset((self.items[a].label, self.items[b].label))
            if key not in done and key not in self.skipped and not {a, b} & self.skipped_images:
                return {"a": a, "b": b, "label_a": self.items[a].label, "label_b": self.items[b].label}
        return None

    def state(self) -> dict[str, Any]:
        learn = self.learn_command or learn_command(None, self.out, self.user)
        return {"mode": self.mode, "scale": self.scale, "target": self.target, "rated": len(self.rows),
                "user": self.user, "out": str(self.out), "next": self.next_item(),
                "last": self.rows[-1] if self.rows else None, "learn_command": learn}

    # -- answers ------------------------------------------------------------------------------------

    def _index(self, body: dict[str, Any], key: str) -> int:
        i = body.get(key)
        if type(i) is not int or not 0 <= i < len(self.items):  # type(), not isinstance: true is no image
            raise BadRequest(f"{key} must be the number of an image (0..{len(self.items) - 1}), not {i!r}")
        return i

    def _label(self, body: dict[str, Any], key: str) -> str:
        return self.items[self._index(body, key)].label

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            user = [self.user] if self.user else []
            if self.mode == "stars":
                score = body.get("score")
                if type(score) is not int or not 1 <= score <= self.scale:
                    raise BadRequest(f"score must be an integer 1..{self.scale}, not {score!r}")
                label = self._label(body, "item")
                if label in self._done_images():
                    raise BadRequest(f"{label} is rated already")
                self._append([label, str(score)] + user)
            else:
                a, b, winner = self._label(body, "a"), self._label(body, "b"), body.get("winner")
                if not isinstance(winner, str) or winner not in WINNERS or a == b:
                    raise BadRequest("winner must be a, b or tie, between two images")
                if frozenset((a, b)) in self._done_pairs():
                    raise BadRequest("this pair is answered already")
                self._append([a, b, winner] + user)
            return self.state()

    def skip(self, body: dict[str, Any]) -> dict[str, Any]:
        """Skip this image or pair for this run; ``unreadable`` (the browser could not show image
        ``bad``) also keeps that image out of every later pair and lists it at the end."""
        with self.lock:
            if body.get("unreadable") is True:
                bad = self._index(body, "bad")
                self.unreadable[self.items[bad].label] = "the browser could not display it"
                self.skipped_images.add(bad)
                self.skipped.add(bad)
            elif self.mode == "stars":
                self.skipped.add(self._index(body, "item"))
            else:
                self.skipped.add(frozenset((self._label(body, "a"), self._label(body, "b"))))
            return self.state()

    def undo(self) -> dict[str, Any]:
        with self.lock:
            if self.rows:
                buf = io.StringIO()
                answers_writer(buf).writerows([self.header] + self.rows[:-1])
                with atomic_write(self.out) as tmp:  # the file is whole before and after
                    tmp.write_text(buf.getvalue(), encoding="utf-8")
                self.rows.pop()  # only once the file no longer holds it
            return self.state()


def _handler(session: Session, hosts: set[str] | None) -> type[BaseHTTPRequestHandler]:
    """``hosts``: the Host values the page is served under (None: any, for a server on every address)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the terminal shows progress, not requests
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: Any, status: int = 200) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _check_sender(self, post: bool) -> None:
            host = self.headers.get("Host", "")
            if hosts is not None and host.lower() not in hosts:
                raise BadRequest(f"this server answers its own page only, not host {host[:80]!r}",
                                 HTTPStatus.MISDIRECTED_REQUEST)
            if not post:
                return
            origin = self.headers.get("Origin")  # every browser sends it on a POST; scripts need not
            if (origin is not None and origin != f"http://{host}") or self.headers.get("Sec-Fetch-Site") == "cross-site":
                raise BadRequest(f"answers come from this server's own page, not from {origin or 'another site'}",
                                 HTTPStatus.FORBIDDEN)
            if self.headers.get_content_type() != "application/json":  # another site's form or text/plain POST
                raise BadRequest("the body must be JSON (Content-Type: application/json)",
                                 HTTPStatus.UNSUPPORTED_MEDIA_TYPE)

        def _body(self) -> dict[str, Any]:
            text = self.headers.get("Content-Length")
            if text is None or not text.isascii() or not text.isdigit():
                raise BadRequest(f"Content-Length must be a byte count, not {text!r}", HTTPStatus.LENGTH_REQUIRED)
            if int(text) > MAX_BODY:
                raise BadRequest(f"a body is at most {MAX_BODY} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            try:
                body = json.loads(self.rfile.read(int(text)) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not JSON ({e})") from None
            if not isinstance(body, dict):
                raise BadRequest("expected a JSON object")
            return body

        def _guarded(self, respond: Callable[[], None]) -> None:
            try:
                respond()
            except BadRequest as e:
                self._json({"error": str(e)}, e.status)
            except OSError as e:
                if self.command != "POST":  # an image file that vanished since the list was made
                    return self._json({"error": f"cannot read it ({e.strerror or e})"}, HTTPStatus.NOT_FOUND)
                note(f"{session.out}: answer not saved ({e.strerror or e})")  # a full disk: the page says so
                self._json({"error": f"could not write {session.out} ({e.strerror or e}); nothing of this answer "
                                     "was saved"}, HTTPStatus.INSUFFICIENT_STORAGE)
            except Exception as e:  # a bug must cost one request, not the server or the file
                note(f"rate: {self.command} {self.path[:80]!r} failed ({type(e).__name__}: {e})")
                self._json({"error": f"internal error ({type(e).__name__})"}, HTTPStatus.INTERNAL_SERVER_ERROR)

        def do_GET(self) -> None:
            self._guarded(self._get)

        def do_POST(self) -> None:
            self._guarded(self._post)

        def _get(self) -> None:
            self._check_sender(post=False)
            path = self.path.split("?", 1)[0]
            image = _IMAGE_PATH.fullmatch(path)
            if path in ("/", "/index.html"):
                return self._send(200, (WEB / "rate.html").read_bytes(), "text/html; charset=utf-8")
            if path.startswith("/static/") and path[len("/static/"):] in STATIC:
                name = path[len("/static/"):]
                return self._send(200, (WEB / name).read_bytes(), STATIC[name])
            if path == "/api/state":
                with session.lock:
                    return self._json(session.state())
            if image and int(image.group(1)) < len(session.items):
                return self._send(200, session.items[int(image.group(1))].load(), "application/octet-stream")
            self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

        def _post(self) -> None:
            self._check_sender(post=True)
            actions = {"/api/answer": session.answer, "/api/skip": session.skip,
                       "/api/undo": lambda _: session.undo()}
            if self.path not in actions:
                return self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            self._json(actions[self.path](self._body()))

    return Handler


def _hosts(host: str, port: int) -> set[str] | None:
    """The Host header values a browser sends for this server's page."""
    if host in ("0.0.0.0", "::", ""):
        return None  # served on every address: reachable by any name, as the warning says
    names = {host, *LOOPBACK} if host in LOOPBACK else {host}
    return {f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names}


def serve(session: Session, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The server, bound (``port`` 0: any free port); call ``serve_forever`` on it."""
    if host not in LOOPBACK:
        note(f"--host {host}: the rating page is reachable from other machines, and anyone who reaches it "
             "can rate and undo")
    try:
        server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as e:
        raise LaionfilterError(f"cannot serve on {host}:{port} ({e.strerror}); is the port in use? try --port 0") from None
    server.RequestHandlerClass = _handler(session, _hosts(host, server.server_address[1]))
    return server


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Ctrl-C and ``kill`` end serve_forever with KeyboardInterrupt, also where the shell started the
    server in the background with SIGINT ignored (Python then installs no handler of its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def learn_command(source: str | None, out: str | os.PathLike, user: str | None = None, allow_pipe: bool = False) -> str:
    """What to run on the answers once done: with --shards where SOURCE is shards (the answers name
    sample keys; None: image files), and into a folder where the file has a user column (one profile
    per user)."""
    from .shards import find_images

    files = source is None or find_images(source) is not None
    shards = [] if files else ["--shards", source, *(["--allow-pipe"] if allow_pipe else [])]
    return shlex.join(["laionfilter", "learn", str(out), *shards, "--out", "profiles/" if user else "me.profile"])


def run(source: str, out: str | os.PathLike, mode: str = "stars", scale: int = 10, target: int = 20,
        user: str | None = None, host: str = "127.0.0.1", port: int = 0, open_browser: bool = False,
        from_scores: str | None = None, echo: Callable[[str], Any] = print, order: str = "random",
        bank=None, allow_pipe: bool = False) -> Session:
    """Serve the rating page until Ctrl-C; returns the session (its answers are on disk already).

    ``order``: random, or active (``bank`` needed): the images whose ratings tell the most first."""
    out = Path(out)
    items = collect_images(source, from_scores, out, allow_pipe)
    hint = None
    if order == "active":
        from .suggest import active_order

        hint = active_order(items, bank)
    elif from_scores:
        hint = list(range(len(items)))  # collect_images put them in score-spread order
    session = Session(out, items, mode=mode, scale=scale, target=target, user=user, order_hint=hint,
                      learn_command=learn_command(source, out, user, allow_pipe))
    server = serve(session, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    try:
        with _stopped_by_signals():  # before the address is printed: a script may signal as soon as it reads it
            echo(f"rating {len(items)} images ({mode}, {session.state()['rated']} answered already) into {out}")
            echo(f"open {url}   (Ctrl-C to stop; every answer is saved as you give it)")
            if open_browser:
                import webbrowser

                webbrowser.open(url)
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    echo(f"\n{out}: {len(session.rows)} answers")
    for label, why in session.unreadable.items():
        echo(f"  skipped, unreadable: {label} ({why})")
    return session
