"""The exec server that runs inside every sandbox: an authenticated JSON-over-HTTP API for running
commands in one persistent shell session and for reading, writing and listing workspace files.

Started as PID 1 (a container's main process) it forks and stays behind as a minimal init that
reaps orphaned processes, see run_as_init.

The commands it runs are the adversary: they must not take the server over (steal its socket,
read its token, answer in its place). So it makes itself non-dumpable at once (ptrace,
/proc/PID/mem, /proc/PID/fd and pidfd_getfd then fail for processes of its own uid), and where it
is given the means (`--command-user`, with CAP_SETUID, CAP_SETGID and CAP_KILL) it runs the shell
as another uid and touches workspace files with that uid's rights (setfsuid), so the commands
cannot even signal it. Its socket, token and ready report can come as inherited file descriptors
(`--listen-fd`, `--token-fd`, `--ready-fd`), so that nothing of them is on a path the commands see."""

# Runs with any python3 >= 3.8 in any image: standard library only, no newer syntax.
#
# Start-up time is the sandbox's start-up time, and imports are most of it: only cheap modules are
# imported here; rarely needed ones (base64, shutil, tempfile, traceback) inside the functions that
# use them, and typing names only for type checkers. The HTTP layer is our own for the same reason
# (http.server drags in email, http.client and ssl).
from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import select
import shlex
import signal
import socket
import socketserver
import stat
import sys
import threading
import time

# The constant-time comparison behind hmac.compare_digest, without hmac's import of OpenSSL.
from _operator import _compare_digest as compare_digest
from functools import partial

# typing.TYPE_CHECKING without importing typing at run time; type checkers take it as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from types import FrameType
    from typing import IO, Any, Callable, Dict, Iterator, List, NoReturn, Optional, Tuple

__version__ = "0.1.0"

MIB = 1024 * 1024
DEFAULT_TIMEOUT = 120.0
MAX_TIMEOUT = 86400.0
DEFAULT_OUTPUT_BYTES = 32768
MIN_OUTPUT_BYTES = 1024
MAX_OUTPUT_BYTES = 16 * MIB
MAX_COMMAND_BYTES = MIB
DEFAULT_READ_BYTES = MIB
MAX_READ_BYTES = 64 * MIB
DEFAULT_LIST_ENTRIES = 1000
MAX_LIST_ENTRIES = 100000
DEFAULT_MAX_BODY_BYTES = 64 * MIB
READ_CHUNK = 65536
# Restoring a snapshot runs only builtins; anything slower means the new shell is unusable.
RESTORE_TIMEOUT = 30.0
# After the shell dies, how long to keep collecting output still queued in its pipes.
DRAIN_SECONDS = 2.0
# A sentinel status line is "<nonce>:<exit code>"; anything longer is not ours.
MAX_STATUS_BYTES = 32


class ApiError(Exception):
    """An error reply: HTTP status, stable machine-readable code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


# A full disk (or a file over the size limit) is the sandbox's state, not the server's fault:
# 507, so the client shows it to the model, which can free space and go on.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(message: str) -> ApiError:
    return ApiError(507, "no_space", message + " (the sandbox's disk limit); free some space")


def display(path: str) -> str:
    """A path as text for JSON replies, even when the file name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "replace")


class Log:
    """Writes log lines to stderr from a thread of its own, dropping lines it cannot keep up with.

    The parent often pipes our stderr without reading it; a full pipe must not stall requests.
    """

    def __init__(self) -> None:
        self._lines: queue.Queue[str] = queue.Queue(maxsize=1000)
        threading.Thread(target=self._run, name="execd-log", daemon=True).start()

    def write(self, line: str) -> None:
        with contextlib.suppress(queue.Full):
            self._lines.put_nowait(line.rstrip("\n") + "\n")

    def flush(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            line = self._lines.get()
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            finally:
                self._lines.task_done()


# ---------------------------------------------------------------------------------------------
# Output capture


class CappedBuffer:
    """Keeps the first and the last bytes of a stream within a fixed budget and counts the rest."""

    def __init__(self, limit: int) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0

    def add(self, data: bytes) -> None:
        if not data:
            return
        self._total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data and self._tail_limit > 0:
            self._tail += data
            # Trimming only when twice over budget keeps the cost amortised linear.
            if len(self._tail) > 2 * self._tail_limit:
                del self._tail[: len(self._tail) - self._tail_limit]

    def render(self) -> Tuple[str, int]:
        """The kept text, with a marker where bytes were cut, and the number of bytes cut."""
        tail = bytes(self._tail[-self._tail_limit :]) if self._tail_limit else b""
        omitted = self._total - len(self._head) - len(tail)
        if not omitted:
            # Decoded as one so a character straddling the head/tail split stays whole.
            return (bytes(self._head) + tail).decode("utf-8", "replace"), 0
        marker = "\n[... %d bytes omitted ...]\n" % omitted
        return self._head.decode("utf-8", "replace") + marker + tail.decode(
            "utf-8", "replace"
        ), omitted


class StreamScanner:
    """Captures one output stream of a command until the command's sentinel line appears in it.

    The sentinel is ``<nonce>:<status>\\n``. Only the newly arrived bytes plus a short held-back
    tail are searched, so scanning stays linear however much the command prints.
    """

    def __init__(self, nonce: bytes, limit: int) -> None:
        self._marker = nonce + b":"
        self.capture = CappedBuffer(limit)
        self._pending = b""
        self.done = False
        self.status = b""

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        buf = self._pending + data
        idx = buf.find(self._marker)
        if idx < 0:
            keep = min(len(buf), len(self._marker) - 1)
            self.capture.add(buf[: len(buf) - keep])
            self._pending = buf[len(buf) - keep :]
            return
        start = idx + len(self._marker)
        end = buf.find(b"\n", start)
        if end < 0 and len(buf) - start <= MAX_STATUS_BYTES:
            self.capture.add(buf[:idx])
            self._pending = buf[idx:]
            return
        self.capture.add(buf[:idx])
        self.status = buf[start:end] if end >= 0 else b""
        self._pending = b""
        self.done = True

    def flush(self) -> None:
        """The stream ended without a sentinel: what was held back is ordinary output."""
        if not self.done:
            self.capture.add(self._pending)
            self._pending = b""


class Collector:
    """Both output streams of one command."""

    def __init__(self, nonce: str, limit: int) -> None:
        self.streams = (
            StreamScanner(nonce.encode("ascii"), limit),
            StreamScanner(nonce.encode("ascii"), limit),
        )

    @property
    def done(self) -> bool:
        return self.streams[0].done and self.streams[1].done

    def exit_code(self) -> int:
        try:
            return int(self.streams[0].status)
        except ValueError:
            return -1


# ---------------------------------------------------------------------------------------------
# The shell session


class Dialect:
    """How to talk to the session's shell: bash when the image has it, else a POSIX sh."""

    def __init__(self, argv: List[str], is_bash: bool) -> None:
        self.argv = argv
        self.is_bash = is_bash
        # Duplicates of the original stdout/stderr pipes, so sentinels reach us even after a
        # command redirects the shell's own output (`exec >log`, `exec 2>&1`); dash allows one digit.
        self.out_fd, self.err_fd = (198, 199) if is_bash else (8, 9)
        self.b = "builtin " if is_bash else ""

    def init_line(self) -> bytes:
        return ("exec %d>&1 %d>&2\n" % (self.out_fd, self.err_fd)).encode()

    def command_line(self, script: str, cwd_file: str, env_file: str, nonce: str) -> bytes:
        """One input line: run the script, snapshot cwd and exports, then print the sentinels.

        The bookkeeping runs with stderr to /dev/null so `set -x` traces stay out of the output,
        each step tolerates failure so `set -e` cannot end the shell there, and the nonce is
        printed in two halves so `set -v` echoing this line cannot fake a sentinel.
        """
        b = self.b
        q = shlex.quote
        source = "builtin source" if self.is_bash else "."
        half = len(nonce) // 2
        sentinel = "%sprintf '%%s%%s:%%s\\n' %s %s \"$__execd_rc\"" % (
            b,
            nonce[:half],
            nonce[half:],
        )
        steps = [
            "%spwd >|%s" % (b, q(cwd_file)),
            "%sexport -p >|%s" % (b, q(env_file)),
            "%s >&%d" % (sentinel, self.out_fd),
            "%s >&%d" % (sentinel, self.err_fd),
        ]
        guarded = "; ".join("%s || %strue" % (step, b) for step in steps)
        line = "%s %s </dev/null; { __execd_rc=$?; %s; %sunset __execd_rc; } 2>/dev/null\n" % (
            source,
            q(script),
            guarded,
            b,
        )
        return line.encode("utf-8", "surrogateescape")

    def restore_script(self, env_snapshot: Optional[bytes], cwd: bytes, root: bytes) -> bytes:
        """Shell code that brings a fresh shell to a snapshot's exported variables and cwd."""
        b = self.b
        parts: List[bytes] = []
        if env_snapshot is not None:
            if self.is_bash:
                # Variables unset or unexported since start must not come back from our own env.
                parts.append(b"builtin unset -v $(builtin compgen -e) 2>/dev/null\n")
            parts.append(env_snapshot)
            if not env_snapshot.endswith(b"\n"):
                parts.append(b"\n")
        parts.append(
            (
                "%scd -- %s 2>/dev/null || %scd -- %s\n"
                % (b, _quote_bytes(cwd), b, _quote_bytes(root))
            ).encode("utf-8", "surrogateescape")
        )
        return b"".join(parts)


def _quote_bytes(path: bytes) -> str:
    return shlex.quote(path.decode("utf-8", "surrogateescape"))


def which(name: str, search: str) -> Optional[str]:
    """The first executable `name` in the directories of `search` (shutil.which, minus import)."""
    for directory in search.split(os.pathsep):
        candidate = os.path.join(directory, name)
        if directory and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_dialect(env: Dict[str, str]) -> Dialect:
    search = env.get("PATH", os.defpath)
    bash = which("bash", search)
    if bash is not None:
        return Dialect([bash, "--noprofile", "--norc"], True)
    return Dialect([which("sh", search) or "/bin/sh"], False)


class Shell:
    """One shell process in its own process group, plus the threads that read its output."""

    def __init__(
        self, dialect: Dialect, env: Dict[str, str], cwd: str, user: Optional[Tuple[int, int]]
    ) -> None:
        # Imported here, in the thread that starts the first shell once we are ready.
        import subprocess

        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            dialect.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            **run_as(user),
        )
        self.cond = threading.Condition()
        self.collector: Optional[Collector] = None
        self.exited = False
        self.eof = [False, False]
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        for index, stream in enumerate((self.proc.stdout, self.proc.stderr)):
            threading.Thread(
                target=self._pump, args=(index, stream), name="execd-pump", daemon=True
            ).start()
        threading.Thread(target=self._wait, name="execd-wait", daemon=True).start()
        self.send(dialect.init_line())

    def _pump(self, index: int, stream: IO[bytes]) -> None:
        fd = stream.fileno()
        try:
            while True:
                try:
                    data = os.read(fd, READ_CHUNK)
                except OSError:
                    data = b""
                with self.cond:
                    collector = self.collector
                    if not data:
                        self.eof[index] = True
                        if collector is not None:
                            collector.streams[index].flush()
                        self.cond.notify_all()
                        return
                    # Output arriving between commands (from background jobs) is dropped.
                    if collector is not None:
                        collector.streams[index].feed(data)
                        if collector.done:
                            self.cond.notify_all()
        finally:
            stream.close()

    def _wait(self) -> None:
        self.proc.wait()
        with self.cond:
            self.exited = True
            self.cond.notify_all()

    def send(self, line: bytes) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(line)
            stdin.flush()
        except OSError:
            # The shell is gone; the caller notices through `exited`.
            pass

    def exit_code(self) -> int:
        code = self.proc.returncode
        if code is None:
            return -1
        # Like the shell itself reports a child killed by a signal.
        return 128 - code if code < 0 else code

    def kill(self) -> None:
        """SIGKILL the whole process group: the shell, its children and background jobs."""
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def drain(self, collector: Collector, seconds: float) -> None:
        """Wait a little for the output still in the pipes, then detach the collector."""
        deadline = time.monotonic() + seconds
        with self.cond:
            while not (self.eof[0] and self.eof[1]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            self.collector = None
            for scanner in collector.streams:
                scanner.flush()


class Outcome:
    """How one command ended: "done" (sentinel seen), "exited" (shell ended) or "timeout"."""

    def __init__(self, kind: str, exit_code: int, collector: Collector, duration: float) -> None:
        self.kind = kind
        self.exit_code = exit_code
        self.collector = collector
        self.duration = duration


class Session:
    """The one persistent shell session; commands run one at a time."""

    def __init__(
        self, root: str, env: Dict[str, str], state_dir: str, user: Optional[Tuple[int, int]]
    ) -> None:
        self._root = root
        self._env = env
        self._user = user
        self._dialect = find_dialect(env)
        self._state_dir = state_dir
        self._script = os.path.join(state_dir, "command.sh")
        self._cwd_file = os.path.join(state_dir, "cwd")
        self._env_file = os.path.join(state_dir, "env")
        self._exec_lock = threading.Lock()
        self._spawn_lock = threading.Lock()
        self._shell: Optional[Shell] = None
        self._closed = False
        self._cwd = os.fsencode(root)
        self._env_snapshot: Optional[bytes] = None

    def start(self) -> None:
        """Start the shell, unless a command got in first and started it."""
        with self._exec_lock:
            if self._shell is None:
                self._restart()

    def close(self) -> None:
        with self._spawn_lock:
            self._closed = True
            if self._shell is not None:
                self._shell.kill()
        import shutil

        shutil.rmtree(self._state_dir, ignore_errors=True)

    def execute(self, command: bytes, timeout: float, limit: int) -> Dict[str, Any]:
        with self._exec_lock:
            restarted = False
            shell = self._shell
            if shell is None or shell.exited:
                shell = self._restart()
                restarted = True
            outcome = self._run(shell, command, timeout, limit)
            if outcome.kind == "done":
                self._take_snapshot()
            else:
                restarted = True
                try:
                    self._restart()
                except ApiError:
                    # Shutting down, or no shell can start: report the command; the next one retries.
                    self._shell = None
            stdout, stdout_cut = outcome.collector.streams[0].capture.render()
            stderr, stderr_cut = outcome.collector.streams[1].capture.render()
            return {
                "exit_code": outcome.exit_code,
                "stdout": stdout,
                "stderr": stderr,
                "stdout_truncated_bytes": stdout_cut,
                "stderr_truncated_bytes": stderr_cut,
                "timed_out": outcome.kind == "timeout",
                "duration_seconds": round(outcome.duration, 3),
                "session_restarted": restarted,
                "cwd": self._cwd.decode("utf-8", "replace"),
            }

    def _restart(self) -> Shell:
        """Replace the shell with a fresh one brought back to the last snapshot."""
        root = os.fsencode(self._root)
        shell = self._spawn()
        restore = self._dialect.restore_script(self._env_snapshot, self._cwd, root)
        if self._run(shell, restore, RESTORE_TIMEOUT, MIN_OUTPUT_BYTES).kind == "done":
            self._take_snapshot()
            return shell
        # The snapshot itself broke the new shell; start over from the root with a clean slate.
        self._env_snapshot = None
        self._cwd = root
        shell = self._spawn()
        restore = self._dialect.restore_script(None, root, root)
        if self._run(shell, restore, RESTORE_TIMEOUT, MIN_OUTPUT_BYTES).kind == "done":
            self._take_snapshot()
        return shell

    def _spawn(self) -> Shell:
        with self._spawn_lock:
            if self._closed:
                raise ApiError(503, "unavailable", "the exec server is shutting down")
            if self._shell is not None:
                self._shell.kill()
            try:
                # A command may have deleted the workspace root; the shell needs it as its cwd.
                os.makedirs(self._root, exist_ok=True)
                self._shell = Shell(self._dialect, self._env, self._root, self._user)
            except OSError as exc:
                self._shell = None
                raise ApiError(
                    500, "internal", "cannot start %s: %s" % (self._dialect.argv[0], exc)
                ) from exc
            return self._shell

    def _run(self, shell: Shell, script: bytes, timeout: float, limit: int) -> Outcome:
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        if not script.endswith(b"\n"):
            script += b"\n"
        # Overwritten, then cut to size: O_TRUNC makes ext4 flush the file on close (~0.2 ms).
        # Never cut to nothing, so the file keeps a page and a short command (rm, to free space)
        # still fits when the state directory's filesystem is full.
        try:
            fd = os.open(self._script, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(script)
                fh.truncate(len(script))
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise no_space(
                    "cannot store a %d-byte command in %s: %s; short commands still run"
                    % (len(script), self._state_dir, exc.strerror)
                ) from None
            raise
        for path in (self._cwd_file, self._env_file):
            with contextlib.suppress(OSError):
                os.unlink(path)
        nonce = os.urandom(16).hex()
        collector = Collector(nonce, limit)
        with shell.cond:
            shell.collector = collector
        started = time.monotonic()
        deadline = started + timeout
        shell.send(self._dialect.command_line(self._script, self._cwd_file, self._env_file, nonce))
        with shell.cond:
            while not collector.done and not shell.exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                shell.cond.wait(remaining)
            done = collector.done
            exited = shell.exited
            if done:
                shell.collector = None
        duration = time.monotonic() - started
        if done:
            return Outcome("done", collector.exit_code(), collector, duration)
        shell.kill()
        if exited:
            shell.drain(collector, DRAIN_SECONDS)
            return Outcome("exited", shell.exit_code(), collector, duration)
        with shell.cond:
            shell.cond.wait_for(lambda: shell.exited, timeout=5)
        shell.drain(collector, DRAIN_SECONDS)
        return Outcome("timeout", 124, collector, duration)

    def _take_snapshot(self) -> None:
        try:
            cwd = read_capped(self._cwd_file, MAX_CWD_BYTES)
            env = read_capped(self._env_file, MAX_SNAPSHOT_BYTES)
        except OSError:
            # The command removed (or replaced) our state files; keep the previous snapshot.
            return
        if cwd.endswith(b"\n"):
            cwd = cwd[:-1]
        if cwd:
            self._cwd = cwd
        self._env_snapshot = env


# The shell writes these files and the command may replace them: what we read back is bounded.
MAX_CWD_BYTES = 64 * 1024
MAX_SNAPSHOT_BYTES = 8 * MIB


def read_capped(path: str, limit: int) -> bytes:
    """A regular file's first bytes, refusing links, FIFOs and devices (which could block or
    never end) and anything over `limit`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks: List[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, "larger than %d bytes" % limit, path)
            chunks.append(chunk)
    finally:
        os.close(fd)


def private_state_dir(root: str) -> str:
    """A mode-0700 directory for command scripts and snapshots, outside the workspace if we can.

    Tried by creating it rather than with os.access, which asks for the real uid: with
    --command-user, files are made with the command user's rights (the fsuid)."""
    temp = os.environ.get("TMPDIR") or "/tmp"
    # Memory first: every command rewrites the script and snapshot files (~0.5 ms faster than ext4).
    for base in ("/dev/shm", temp, "/tmp", "/var/tmp", "~"):
        real = os.path.realpath(os.path.expanduser(base))
        if is_inside(real, root):
            continue
        try:
            return make_private_dir(real)
        except OSError:
            continue
    return make_private_dir(os.path.realpath(temp))


def random_name(prefix: str, suffix: str = "") -> str:
    return prefix + os.urandom(8).hex() + suffix


def make_private_dir(parent: str) -> str:
    """A new mode-0700 directory with a random name (tempfile.mkdtemp, minus its import)."""
    while True:
        path = os.path.join(parent, random_name("execd-"))
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def create_temp_file(directory: str, prefix: str, suffix: str = "") -> Tuple[int, str]:
    """A new mode-0600 file with a random name, open for writing (tempfile.mkstemp, minus import)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        path = os.path.join(directory, random_name(prefix, suffix))
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue


# ---------------------------------------------------------------------------------------------
# Files


def is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def text_slice(
    fh: IO[bytes], start: int, end: int, max_bytes: int, chunk_size: int = MIB
) -> Tuple[bytes, bool, int]:
    """Lines start..end (1-based, inclusive, end -1 = last) of a file, capped at max_bytes.

    Streams the file in chunks so any size works; returns (content, truncated, total_lines).
    """
    out = bytearray()
    truncated = False
    line = 1
    last = b""
    while True:
        chunk = fh.read(chunk_size)
        if not chunk:
            break
        last = chunk[-1:]
        pos = 0
        while pos < len(chunk):
            if end != -1 and line > end:
                line += chunk.count(b"\n", pos)
                break
            if line < start:
                newlines = chunk.count(b"\n", pos)
                if line + newlines < start:
                    line += newlines
                    break
                nl = chunk.find(b"\n", pos)
                line += 1
                pos = nl + 1
                continue
            # Inside the range: take whole lines up to the range end, or the rest of the chunk.
            stop = len(chunk)
            lines_taken = chunk.count(b"\n", pos)
            if end != -1 and line + lines_taken > end:
                stop = pos
                for _ in range(end - line + 1):
                    stop = chunk.find(b"\n", stop) + 1
                lines_taken = end - line + 1
            piece = chunk[pos:stop]
            room = max_bytes - len(out)
            if len(piece) > room:
                out += piece[: max(room, 0)]
                truncated = True
            else:
                out += piece
            line += lines_taken
            pos = stop
    total = line - 1 if last in (b"", b"\n") else line
    return bytes(out), truncated, total


def _trim_partial_utf8(data: bytes) -> bytes:
    """Drop a multi-byte character that a byte cap cut in half."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:
            expected = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            if byte >= 0xC0 and back < expected:
                return data[:-back]
            return data
    return data


def _classify(entry: os.DirEntry[str]) -> Tuple[str, int]:
    if entry.is_symlink():
        return "symlink", entry.stat(follow_symlinks=False).st_size
    if entry.is_dir(follow_symlinks=False):
        return "dir", 0
    if entry.is_file(follow_symlinks=False):
        return "file", entry.stat(follow_symlinks=False).st_size
    return "other", 0


def _sorted_entries(path: str) -> List[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def os_error(exc: OSError, path: str) -> ApiError:
    shown = repr(path)
    if exc.errno == errno.ENOENT:
        return ApiError(404, "no_such_file", "no such file or directory: %s" % shown)
    if exc.errno == errno.EISDIR:
        return ApiError(400, "is_directory", "%s is a directory" % shown)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return ApiError(400, "not_a_directory", "a component of %s is not a directory" % shown)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ApiError(403, "permission_denied", "permission denied: %s" % shown)
    if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
        return bad_request("%s: %s" % (shown, exc.strerror))
    if exc.errno in NO_SPACE_ERRNOS:
        return no_space("cannot write %s: %s" % (shown, exc.strerror))
    return ApiError(500, "internal", "%s: %s" % (shown, exc.strerror or exc))


class Files:
    """The file endpoints, confined to the workspace root."""

    def __init__(self, root: str) -> None:
        self.root = root

    def resolve(self, given: str) -> str:
        """The real path a client path names, refused unless it is the root or inside it."""
        if "\x00" in given:
            raise bad_request("field 'path' contains a NUL character")
        joined = given if os.path.isabs(given) else os.path.join(self.root, given)
        try:
            real = os.path.realpath(joined)
        except (OSError, ValueError) as exc:
            raise bad_request("field 'path' is not usable: %s" % exc) from exc
        if not is_inside(real, self.root):
            raise ApiError(
                403,
                "path_outside_root",
                "path %r resolves outside the workspace root %s" % (given, display(self.root)),
            )
        return real

    def read_file(self, body: Dict[str, Any]) -> Dict[str, Any]:
        given = req_str(body, "path")
        encoding = opt_choice(body, "encoding", ("utf-8", "base64"), "utf-8")
        start = opt_int(body, "start_line", 1)
        end = opt_int(body, "end_line", -1)
        max_bytes = min(opt_int(body, "max_bytes", DEFAULT_READ_BYTES), MAX_READ_BYTES)
        ranged = body.get("start_line") is not None or body.get("end_line") is not None
        if ranged and encoding != "utf-8":
            raise bad_request("fields 'start_line' and 'end_line' need encoding utf-8")
        if start < 1:
            raise bad_request("field 'start_line' must be >= 1")
        if end != -1 and end < start:
            raise bad_request("field 'end_line' must be -1 or >= start_line")
        if max_bytes < 1:
            raise bad_request("field 'max_bytes' must be >= 1")
        real = self.resolve(given)
        try:
            # O_NONBLOCK so that opening a FIFO cannot hang the request.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise os_error(exc, given) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ApiError(400, "is_directory", "%r is a directory" % given)
            raise bad_request("%r is not a regular file" % given)
        with os.fdopen(fd, "rb") as fh:
            reply: Dict[str, Any] = {"path": display(real), "encoding": encoding}
            if encoding == "base64":
                import base64

                data = fh.read(max_bytes + 1)
                reply["content"] = base64.b64encode(data[:max_bytes]).decode("ascii")
                reply["truncated"] = len(data) > max_bytes
            else:
                data, truncated, total = text_slice(fh, start, end, max_bytes)
                if truncated:
                    data = _trim_partial_utf8(data)
                reply["content"] = data.decode("utf-8", "replace")
                reply["truncated"] = truncated
                reply["total_lines"] = total
            reply["size"] = st.st_size
            return reply

    def write_file(self, body: Dict[str, Any]) -> Dict[str, Any]:
        given = req_str(body, "path")
        content = body.get("content")
        if not isinstance(content, str):
            raise bad_request(
                "field 'content' is required"
                if content is None
                else "field 'content' must be a string"
            )
        encoding = opt_choice(body, "encoding", ("utf-8", "base64"), "utf-8")
        append = opt_bool(body, "append", False)
        mode: Optional[int] = None
        if body.get("mode") is not None:
            mode = opt_int(body, "mode", 0o644)
            if not 0 <= mode <= 0o7777:
                raise bad_request("field 'mode' must be a permission mode between 0 and 0o7777")
        if encoding == "base64":
            import base64
            import binascii

            try:
                data = base64.b64decode(content.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError) as exc:
                raise bad_request("field 'content' is not valid base64") from exc
        else:
            try:
                data = content.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise bad_request("field 'content' is not encodable as UTF-8") from exc
        real = self.resolve(given)
        if os.path.isdir(real):
            raise ApiError(400, "is_directory", "%r is a directory" % given)
        parent = os.path.dirname(real)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, given) from exc
        # realpath above already followed every symlink in the parent; re-check after mkdir.
        if not is_inside(os.path.realpath(parent), self.root):
            raise ApiError(403, "path_outside_root", "path %r escapes the root" % given)
        try:
            if append:
                size = self._append(real, data, mode)
            else:
                size = self._replace(real, parent, data, mode)
        except OSError as exc:
            raise os_error(exc, given) from exc
        return {"path": display(real), "size": size}

    @staticmethod
    def _append(real: str, data: bytes, mode: Optional[int]) -> int:
        fd = os.open(real, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fd, mode)
            fh.write(data)
            fh.flush()
            return os.fstat(fd).st_size

    @staticmethod
    def _replace(real: str, parent: str, data: bytes, mode: Optional[int]) -> int:
        if mode is None:
            # Overwriting keeps an existing file's mode (an executable script stays executable).
            try:
                mode = stat.S_IMODE(os.stat(real).st_mode)
            except OSError:
                mode = 0o644
        fd, tmp = create_temp_file(parent, ".execd-", ".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                os.fchmod(fd, mode)
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(data)

    def list_dir(self, body: Dict[str, Any]) -> Dict[str, Any]:
        given = req_str(body, "path")
        recursive = opt_bool(body, "recursive", False)
        limit = min(opt_int(body, "max_entries", DEFAULT_LIST_ENTRIES), MAX_LIST_ENTRIES)
        if limit < 1:
            raise bad_request("field 'max_entries' must be >= 1")
        real = self.resolve(given)
        try:
            if not stat.S_ISDIR(os.stat(real).st_mode):
                raise ApiError(400, "not_a_directory", "%r is not a directory" % given)
            top = _sorted_entries(real)
        except OSError as exc:
            raise os_error(exc, given) from exc
        entries: List[Dict[str, Any]] = []
        truncated = False
        # Depth-first, each directory's entries by name, a directory right before its contents.
        stack: List[Tuple[str, Iterator[os.DirEntry[str]]]] = [("", iter(top))]
        while stack and not truncated:
            prefix, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            try:
                kind, size = _classify(entry)
            except OSError:
                continue
            if len(entries) >= limit:
                truncated = True
                break
            rel = prefix + entry.name
            entries.append({"path": display(rel), "type": kind, "size": size})
            if recursive and kind == "dir":
                with contextlib.suppress(OSError):
                    stack.append((rel + "/", iter(_sorted_entries(entry.path))))
        return {"path": display(real), "entries": entries, "truncated": truncated}


# ---------------------------------------------------------------------------------------------
# Request fields


def req_str(body: Dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise bad_request("field %r is required" % name)
    if not isinstance(value, str):
        raise bad_request("field %r must be a string" % name)
    if not value:
        raise bad_request("field %r must not be empty" % name)
    return value


def opt_int(body: Dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("field %r must be an integer" % name)
    return value


def opt_number(body: Dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request("field %r must be a number" % name)
    return float(value)


def opt_bool(body: Dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request("field %r must be a boolean" % name)
    return value


def opt_choice(body: Dict[str, Any], name: str, choices: Tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in choices:
        raise bad_request("field %r must be one of %s" % (name, ", ".join(choices)))
    return str(value)


# ---------------------------------------------------------------------------------------------
# HTTP


class App:
    """Everything the request handlers share."""

    def __init__(self, root: str, token: str, session: Session, max_body: int, log: Log) -> None:
        self.root = root
        self.token = token.encode("utf-8")
        self.session = session
        self.files = Files(root)
        self.max_body = max_body
        self.log = log
        self.stopper = Stopper()

    def exec_command(self, body: Dict[str, Any]) -> Dict[str, Any]:
        command = req_str(body, "command")
        try:
            raw = command.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request("field 'command' is not encodable as UTF-8") from exc
        if len(raw) > MAX_COMMAND_BYTES:
            raise bad_request("field 'command' is longer than %d bytes" % MAX_COMMAND_BYTES)
        timeout = opt_number(body, "timeout", DEFAULT_TIMEOUT)
        # `not 0 < x` also rejects NaN.
        if not 0 < timeout <= MAX_TIMEOUT:
            raise bad_request("field 'timeout' must be > 0 and <= %d seconds" % MAX_TIMEOUT)
        limit = opt_int(body, "max_output_bytes", DEFAULT_OUTPUT_BYTES)
        if not MIN_OUTPUT_BYTES <= limit <= MAX_OUTPUT_BYTES:
            raise bad_request(
                "field 'max_output_bytes' must be between %d and %d"
                % (MIN_OUTPUT_BYTES, MAX_OUTPUT_BYTES)
            )
        return self.session.execute(raw, timeout, limit)

    def shutdown(self, body: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True}

    def routes(self) -> Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]]:
        return {
            "/exec": self.exec_command,
            "/files/read": self.files.read_file,
            "/files/write": self.files.write_file,
            "/files/list": self.files.list_dir,
            "/shutdown": self.shutdown,
        }


# The HTTP/1.1 subset we speak. Limits as in http.server: they bound a connection's memory.
MAX_LINE_BYTES = 65536
MAX_HEADERS = 100
# Each of the server's threads (one per connection, the shell's pumps) gets this much stack, not
# the 8 MiB default: under a sandbox's RLIMIT_AS (the memory cap where no cgroup is available)
# the default stacks alone use the cap up after a few threads. Deep enough for the recursion
# limit in JSON parsing.
THREAD_STACK_BYTES = 2 * 1024 * 1024
# Idle keep-alive connections and stalled uploads give up after this many seconds.
IDLE_TIMEOUT = 300
# Replies smaller than this leave in one write; bigger ones are not copied to prepend the headers.
SMALL_REPLY_BYTES = 65536
REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    507: "Insufficient Storage",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def request_path(target: str) -> str:
    """The path of a request target, origin form (/a?b) or absolute form (http://host/a?b)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        _, sep, rest = path.partition("://")
        if sep:
            path = "/" + rest.partition("/")[2]
    return path


def encode_reply(obj: Dict[str, Any]) -> bytes:
    """A reply as UTF-8 JSON.

    The C encoder's ASCII mode escapes ~30% faster (1 ms per MB of command output) and writes the
    same bytes for ASCII text; when a top-level string is not ASCII, UTF-8 keeps the reply small.
    Non-ASCII strings nested deeper may come out as \\u escapes: the same JSON.
    """
    ascii_only = all(value.isascii() for value in obj.values() if isinstance(value, str))
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "replace")


class Handler(socketserver.StreamRequestHandler):
    """One HTTP/1.1 connection: requests one after another, every failure a JSON error reply."""

    # StreamRequestHandler applies it to the socket: the idle timeout of a connection.
    timeout = IDLE_TIMEOUT
    server_version = "execd/" + __version__

    def __init__(self, request: Any, client_address: Any, server: Any, app: App) -> None:
        self.app = app
        self.requestline = ""
        self.command = ""
        self.path = ""
        self.headers: Dict[str, str] = {}
        self.close_connection = False
        self._unread = 0
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and a big body leave in two writes; Nagle would hold the body for an ACK.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        while not self.close_connection:
            try:
                if not self._read_request_head():
                    return
            except ApiError as exc:
                # The request cannot be delimited, so neither can the next one.
                self.close_connection = True
                self._fail(exc)
                return
            except OSError:
                # Idle timeout or the client went away.
                return
            self._handle()

    def header(self, name: str, default: str = "") -> str:
        """A request header by case-insensitive name; repeated headers joined with commas."""
        return self.headers.get(name.lower(), default)

    # --- reading a request

    def _read_line(self, status: int, what: str) -> bytes:
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise ApiError(status, "too_large", "%s longer than %d bytes" % (what, MAX_LINE_BYTES))
        return line

    def _read_request_head(self) -> bool:
        """The request line and headers; False when the client closed the connection instead."""
        self.requestline = self.command = self.path = ""
        self.headers = {}
        self._unread = 0
        raw = self._read_line(414, "request line")
        self.requestline = raw.decode("latin-1").rstrip("\r\n")
        if not self.requestline:
            return False
        words = self.requestline.split()
        if len(words) != 3:
            raise bad_request("malformed request line %r" % self.requestline[:100])
        method, target, version = words
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            if version.startswith("HTTP/"):
                raise ApiError(505, "bad_request", "HTTP version %s is not supported" % version)
            raise bad_request("malformed request line %r" % self.requestline[:100])
        self.command, self.path = method, target
        for _ in range(MAX_HEADERS + 1):
            line = self._read_line(431, "header line")
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise bad_request("malformed header line %r" % line[:100])
            key = name.lower()
            value = value.strip()
            self.headers[key] = self.headers[key] + ", " + value if key in self.headers else value
        else:
            raise ApiError(431, "too_large", "more than %d header lines" % MAX_HEADERS)
        tokens = {t.strip() for t in self.header("Connection").lower().split(",")}
        if version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in tokens
        else:
            self.close_connection = "close" in tokens
        if version == "HTTP/1.1" and self.header("Expect").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _content_length(self) -> int:
        if self.header("Transfer-Encoding"):
            self.close_connection = True
            raise bad_request("chunked request bodies are not supported; send Content-Length")
        raw = self.header("Content-Length")
        if not raw:
            return 0
        if not (raw.isascii() and raw.isdigit()):
            self.close_connection = True
            raise bad_request("invalid Content-Length %r" % raw)
        return int(raw)

    def _read_json(self, allow_empty: bool) -> Dict[str, Any]:
        length = self._unread
        if length > self.app.max_body:
            raise ApiError(
                413,
                "too_large",
                "request body of %d bytes exceeds the limit of %d bytes"
                % (length, self.app.max_body),
            )
        raw = self._read_exactly(length)
        self._unread = 0
        if not raw.strip() and allow_empty:
            return {}
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad_request("request body is not valid JSON: %s" % exc) from exc
        except RecursionError:
            raise bad_request("request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        return body

    def _read_exactly(self, length: int) -> bytes:
        # In chunks: memory grows with what the client sends, not with what it announces.
        chunks: List[bytes] = []
        remaining = length
        while remaining > 0:
            try:
                chunk = self.rfile.read(min(remaining, READ_CHUNK))
            except OSError:
                chunk = b""
            if not chunk:
                self.close_connection = True
                raise bad_request("request body ended early")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _discard_body(self) -> None:
        """Consume an unread body so the reply is not lost to a TCP reset on close."""
        remaining = self._unread
        self._unread = 0
        if remaining <= 0:
            return
        if remaining > self.app.max_body:
            # Too big to swallow: take what is already buffered, briefly, and hang up.
            self.close_connection = True
            remaining = min(remaining, MIB)
            self.connection.settimeout(1.0)
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, READ_CHUNK))
                if not chunk:
                    self.close_connection = True
                    return
                remaining -= len(chunk)
        except OSError:
            self.close_connection = True

    # --- answering it

    def _handle(self) -> None:
        stop_after = False
        try:
            self._unread = self._content_length()
            path = request_path(self.path)
            if path == "/healthz" and self.command == "GET":
                self._reply(200, {"ok": True, "version": __version__})
                return
            self._authorize()
            handler = self.app.routes().get(path)
            if handler is None and path != "/healthz":
                raise ApiError(404, "not_found", "no endpoint %s" % path)
            if handler is None or self.command != "POST":
                allowed = "GET" if path == "/healthz" else "POST"
                raise ApiError(
                    405, "method_not_allowed", "%s %s: use %s" % (self.command, path, allowed)
                )
            body = self._read_json(allow_empty=path == "/shutdown")
            result = handler(body)
            stop_after = path == "/shutdown"
            self.close_connection = self.close_connection or stop_after
            self._reply(200, result)
        except ApiError as exc:
            self._fail(exc)
        except Exception as exc:
            import traceback

            self.app.log.write("execd: internal error: %s" % traceback.format_exc())
            self._fail(ApiError(500, "internal", "%s: %s" % (type(exc).__name__, exc)))
        finally:
            if stop_after:
                self.app.stopper.request()

    def _authorize(self) -> None:
        scheme, _, credential = self.header("Authorization").strip().partition(" ")
        given = credential.strip().encode("latin-1", "replace")
        ok = scheme.lower() == "bearer" and compare_digest(given, self.app.token)
        if not ok:
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")

    def _fail(self, exc: ApiError) -> None:
        headers: List[Tuple[str, str]] = []
        if exc.status == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        if exc.status == 405:
            headers.append(("Allow", "GET" if request_path(self.path) == "/healthz" else "POST"))
        if exc.status == 413:
            self.close_connection = True
        else:
            self._discard_body()
        self._reply(exc.status, {"error": {"code": exc.code, "message": exc.message}}, headers)
        if exc.status == 413:
            self._discard_body()

    def _reply(
        self, status: int, obj: Dict[str, Any], headers: Optional[List[Tuple[str, str]]] = None
    ) -> None:
        data = encode_reply(obj)
        lines = [
            "HTTP/1.1 %d %s" % (status, REASONS.get(status, "")),
            "Server: " + self.server_version,
            "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
            "Content-Type: application/json",
            "Content-Length: %d" % len(data),
        ]
        lines.extend("%s: %s" % header for header in headers or [])
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._log_request(status, len(data))
        if self.command == "HEAD":
            data = b""
        try:
            if len(data) < SMALL_REPLY_BYTES:
                self.wfile.write(head + data)
            else:
                self.wfile.write(head)
                self.wfile.write(data)
        except OSError:
            # The client went away; nothing left to tell it.
            self.close_connection = True

    def _log_request(self, status: int, size: int) -> None:
        # Unix-socket peers have no (host, port) address.
        peer = self.client_address
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        self.app.log.write(
            "%s execd %s %s %d %d"
            % (
                time.strftime("%Y-%m-%dT%H:%M:%S"),
                address,
                ascii(self.requestline[:200]),
                status,
                size,
            )
        )


class TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class TCP6Server(TCPServer):
    address_family = socket.AF_INET6


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


# ---------------------------------------------------------------------------------------------
# Privileges

PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
# What the server keeps when it drops to --drop-to: start shells as the command user, and kill them.
KEPT_CAPS = (CAP_KILL, CAP_SETGID, CAP_SETUID)
_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """The server cannot take the identity it was asked to run with."""


class Libc:
    """prctl, capset and setfsuid, which the standard library lacks, through ctypes (imported
    only here: it costs a few milliseconds of start-up)."""

    def __init__(self) -> None:
        try:
            import ctypes
        except ImportError as exc:
            raise PrivilegeError("python3 here has no ctypes module (%s)" % exc) from exc
        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc: int, what: str) -> int:
        if rc == -1:
            err = self.ctypes.get_errno()
            raise PrivilegeError("%s failed: %s" % (what, os.strerror(err)))
        return rc

    def prctl(self, option: int, value: int) -> None:
        c = self.ctypes
        self._check(
            self.lib.prctl(
                c.c_int(option), c.c_ulong(value), c.c_ulong(0), c.c_ulong(0), c.c_ulong(0)
            ),
            "prctl(%d)" % option,
        )

    def capset(self, caps: Tuple[int, ...]) -> None:
        """Effective = permitted = `caps` (all below 32), nothing inheritable, for this thread."""
        c = self.ctypes
        mask = 0
        for cap in caps:
            mask |= 1 << cap
        # struct __user_cap_header_struct {u32 version; int pid (0: this thread)}, then two
        # struct __user_cap_data_struct {u32 effective, permitted, inheritable} (caps 0-31, 32-63).
        header = (c.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
        data = (c.c_uint32 * 6)(mask, mask, 0, 0, 0, 0)
        self._check(self.lib.capset(header, data), "capset")

    def set_fs_ids(self, uid: int, gid: int) -> None:
        """File-system uid and gid of this thread (and of threads it starts from now on)."""
        self.lib.setfsgid(gid)
        self.lib.setfsuid(uid)
        # Both return the previous value and signal failure only by not changing: ask again.
        if self.lib.setfsgid(-1) != gid or self.lib.setfsuid(-1) != uid:
            raise PrivilegeError(
                "setfsuid/setfsgid to %d:%d failed (needs CAP_SETUID)" % (uid, gid)
            )


def effective_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


class Identity:
    """Who the server and its commands run as, set up before anything else happens.

    Without options the server only makes itself non-dumpable (best effort: a python3 without
    ctypes gets a warning). With `drop_to` it leaves root for that uid, keeping KEPT_CAPS. With
    `command_user` every shell runs as that uid, and workspace files are made and read with its
    rights (the file-system uid), so nothing the server writes for a command is the server's own.
    """

    def __init__(
        self, drop_to: Optional[Tuple[int, int]], command_user: Optional[Tuple[int, int]]
    ) -> None:
        self.drop_to = drop_to
        self.command_user = command_user
        self.libc: Optional[Libc] = None
        self.warnings: List[str] = []

    def harden(self) -> None:
        """Drop to `drop_to` if asked; then non-dumpable, checked to hold KEPT_CAPS if needed."""
        try:
            self.libc = Libc()
        except PrivilegeError as exc:
            if self.drop_to is not None or self.command_user is not None:
                raise
            self.warnings.append("cannot make the exec server non-dumpable: %s" % exc)
            return
        if self.drop_to is not None:
            self._drop(*self.drop_to)
        self.libc.prctl(PR_SET_DUMPABLE, 0)
        if self.command_user is not None:
            caps = effective_caps()
            missing = [c for c in KEPT_CAPS if not caps & (1 << c)]
            if missing:
                raise PrivilegeError(
                    "--command-user needs CAP_KILL, CAP_SETGID and CAP_SETUID (start the server "
                    "as root with --drop-to, or grant them)"
                )

    def _drop(self, uid: int, gid: int) -> None:
        assert self.libc is not None
        if os.geteuid() != 0:
            raise PrivilegeError("--drop-to %d:%d needs the server to start as root" % (uid, gid))
        try:
            self.libc.prctl(PR_SET_KEEPCAPS, 1)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            self.libc.prctl(PR_SET_KEEPCAPS, 0)
        except OSError as exc:
            raise PrivilegeError("cannot drop to %d:%d: %s" % (uid, gid, exc)) from exc
        self.libc.capset(KEPT_CAPS)

    def act_as_commands(self) -> None:
        """From here on, this thread and the threads it starts touch files as the command user."""
        if self.command_user is not None:
            assert self.libc is not None
            self.libc.set_fs_ids(*self.command_user)

    def act_as_server(self) -> None:
        if self.command_user is not None:
            assert self.libc is not None
            self.libc.set_fs_ids(os.geteuid(), os.getegid())


def run_as(user: Optional[Tuple[int, int]]) -> Dict[str, Any]:
    """Popen arguments that start a child as `user` with no supplementary groups."""
    if user is None:
        return {}
    uid, gid = user
    if sys.version_info >= (3, 9):
        return {"user": uid, "group": gid, "extra_groups": []}

    def demote() -> None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    return {"preexec_fn": demote}


# ---------------------------------------------------------------------------------------------
# Startup


class Stopper:
    """A self-pipe the main thread sleeps on until a signal or /shutdown asks it to exit."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)

    def request(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"x")

    def wait(self) -> None:
        select.select([self.read_fd], [], [])


def watch_parent(fd: int, stopper: Stopper, log: Log) -> None:
    """Until the host's end of --parent-fd closes; then stop the server (and its commands)."""
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            log.write("execd: the host closed --parent-fd; stopping")
            stopper.request()
            return


def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
    """Nothing to do here: the wakeup fd has already woken the main thread."""


def fail(message: str, code: int = 2) -> NoReturn:
    sys.stderr.write("execd: error: %s\n" % message)
    sys.exit(code)


USAGE = """\
usage: execd.py --root DIR [--unix-socket PATH | --listen-fd N] [--host HOST] [--port N]
                [--token-file PATH | --token-fd N] [--ready-file PATH | --ready-fd N]
                [--drop-to UID:GID] [--command-user UID:GID] [--max-body-bytes N]
                [--parent-fd N]

Exec server for one sandbox (token from EXECD_TOKEN, --token-file or --token-fd).

  --root DIR            workspace root, created if missing
  --host HOST           TCP address to bind (default 127.0.0.1)
  --port N              TCP port; 0 picks a free one
  --unix-socket PATH    path of a unix socket to listen on
  --listen-fd N         an inherited, listening unix socket to serve on
  --ready-file PATH     written atomically once listening
  --ready-fd N          an inherited pipe: one JSON line once listening, then closed
  --token-file PATH     file holding the bearer token
  --token-fd N          an inherited pipe holding the bearer token (read to its end)
  --drop-to UID:GID     start as root, then run as UID:GID keeping only CAP_KILL, CAP_SETGID
                        and CAP_SETUID
  --command-user UID:GID
                        run commands, and touch workspace files, as UID:GID
  --max-body-bytes N    largest request body (default %d)
  --parent-fd N         an inherited pipe the host holds open: when it closes (the host is
                        gone, however it ended) the server stops as on SIGTERM
"""


OPTION_NAMES = (
    "--root",
    "--host",
    "--port",
    "--unix-socket",
    "--listen-fd",
    "--ready-file",
    "--ready-fd",
    "--token-file",
    "--token-fd",
    "--drop-to",
    "--command-user",
    "--max-body-bytes",
    "--parent-fd",
)


class Options:
    """The command line (argparse costs more start-up time than this whole server)."""

    def __init__(self) -> None:
        self.root = ""
        self.host = "127.0.0.1"
        self.port: Optional[int] = None
        self.unix_socket: Optional[str] = None
        self.listen_fd: Optional[int] = None
        self.ready_file: Optional[str] = None
        self.ready_fd: Optional[int] = None
        self.token_file: Optional[str] = None
        self.token_fd: Optional[int] = None
        self.drop_to: Optional[Tuple[int, int]] = None
        self.command_user: Optional[Tuple[int, int]] = None
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES
        self.parent_fd: Optional[int] = None


def parse_args(argv: Optional[List[str]]) -> Options:  # noqa: C901, PLR0915 - one branch per option, stdlib only (no argparse: its errors print usage)
    """`--name value` or `--name=value` for each option of USAGE; exits 2 on anything else."""

    def usage_error(message: str) -> NoReturn:
        sys.stderr.write(USAGE.split("\n\n")[0] + "\n")
        fail(message)

    def integer(name: str, value: str) -> int:
        try:
            return int(value)
        except ValueError:
            usage_error("%s: invalid integer %r" % (name, value))

    def ids(name: str, value: str) -> Tuple[int, int]:
        uid, colon, gid = value.partition(":")
        if not (colon and uid.isdigit() and gid.isdigit()):
            usage_error("%s: expected UID:GID, got %r" % (name, value))
        return int(uid), int(gid)

    def descriptor(name: str, value: str) -> int:
        fd = integer(name, value)
        if fd < 3:
            usage_error("%s: %d is not an inherited descriptor (3 or more)" % (name, fd))
        return fd

    opts = Options()
    args = list(sys.argv[1:] if argv is None else argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE % DEFAULT_MAX_BODY_BYTES)
            sys.exit(0)
        name, equals, value = arg.partition("=")
        if name not in OPTION_NAMES:
            usage_error("unrecognized argument %s" % arg)
        if not equals:
            if not args:
                usage_error("%s needs a value" % name)
            value = args.pop(0)
        if name == "--root":
            opts.root = value
        elif name == "--host":
            opts.host = value
        elif name == "--port":
            opts.port = integer(name, value)
        elif name == "--unix-socket":
            opts.unix_socket = value
        elif name == "--listen-fd":
            opts.listen_fd = descriptor(name, value)
        elif name == "--ready-file":
            opts.ready_file = value
        elif name == "--ready-fd":
            opts.ready_fd = descriptor(name, value)
        elif name == "--token-file":
            opts.token_file = value
        elif name == "--token-fd":
            opts.token_fd = descriptor(name, value)
        elif name == "--drop-to":
            opts.drop_to = ids(name, value)
        elif name == "--command-user":
            opts.command_user = ids(name, value)
        elif name == "--parent-fd":
            opts.parent_fd = descriptor(name, value)
        else:
            opts.max_body_bytes = integer(name, value)
    if not opts.root:
        usage_error("--root is required")
    if opts.port is None and opts.unix_socket is None and opts.listen_fd is None:
        usage_error("give --port, --unix-socket, --listen-fd or several")
    for one, other in (
        ("unix_socket", "listen_fd"),
        ("token_file", "token_fd"),
        ("ready_file", "ready_fd"),
    ):
        if getattr(opts, one) is not None and getattr(opts, other) is not None:
            usage_error(
                "give --%s or --%s, not both" % (one.replace("_", "-"), other.replace("_", "-"))
            )
    if opts.command_user is not None and opts.command_user == opts.drop_to:
        usage_error("--command-user must differ from --drop-to: that difference is the point")
    if opts.port is not None and not 0 <= opts.port <= 65535:
        usage_error("--port must be between 0 and 65535")
    if opts.max_body_bytes < 1:
        usage_error("--max-body-bytes must be positive")
    return opts


def read_token(token_file: Optional[str], token_fd: Optional[int] = None) -> str:
    if token_fd is not None:
        try:
            with os.fdopen(token_fd, "rb") as pipe:
                token = pipe.read(4096).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail("cannot read --token-fd %d: %s" % (token_fd, exc))
        if not token:
            fail("--token-fd %d gave no token" % token_fd)
        return token
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail("cannot read --token-file %s: %s" % (token_file, exc))
        if not token:
            fail("--token-file %s is empty" % token_file)
        return token
    token = os.environ.get("EXECD_TOKEN", "").strip()
    if not token:
        fail("no token: set EXECD_TOKEN or pass --token-file")
    return token


def shell_env(token: str) -> Dict[str, str]:
    """Our environment minus everything that is ours: EXECD_* and anything holding the token."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("EXECD_") and value.strip() != token
    }


def bind_unix(path: str, handler: Callable[..., Handler]) -> Tuple[UnixServer, int]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        # A socket left behind by an earlier run that did not clean up.
        os.unlink(path)
    server = UnixServer(path, handler)
    return server, os.lstat(path).st_ino


def inherited_unix_server(fd: int, handler: Callable[..., Handler]) -> UnixServer:
    """Serve on a listening unix socket made (and bound where only the host sees it) by our
    parent."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError(errno.EINVAL, "--listen-fd %d is not a unix stream socket" % fd)
    server = UnixServer(sock.getsockname() or "", handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    return server


def write_ready_fd(fd: int, info: Dict[str, Any]) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as pipe:
        pipe.write(json.dumps(info) + "\n")


def write_ready_file(path: str, info: Dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = create_temp_file(directory, ".ready-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            # Readable by whoever watches for it; it holds no secret.
            os.fchmod(fd, 0o644)
            json.dump(info, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def start_session(session: Session, log: Log) -> None:
    try:
        session.start()
    except (ApiError, OSError) as exc:
        log.write("execd: cannot start the shell yet (retried on the first command): %s" % exc)


# Signals an init process passes on to the server.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_as_init() -> Optional[int]:
    """PID 1 (a container's main process) must reap orphans, or they stay zombies for good.

    Forks: the child returns None and goes on to be the server; the parent stays a minimal
    init that forwards signals to it, reaps every process that ends up parented to PID 1 and
    returns the server's exit status once the server has exited.
    """
    # Blocked across the fork so none is lost before the parent's handlers are in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    server_pid = os.fork()
    if server_pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        return None

    def forward(signum: int, frame: Optional[FrameType]) -> None:
        with contextlib.suppress(OSError):
            os.kill(server_pid, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        if pid == server_pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)


def main(argv: Optional[List[str]] = None) -> int:  # noqa: C901, PLR0915 - the start-up order (privileges, fds, socket) is clearest as one sequence
    args = parse_args(argv)
    identity = Identity(args.drop_to, args.command_user)
    # First of all: nothing the commands can do may reach into this process.
    try:
        identity.harden()
    except PrivilegeError as exc:
        fail(str(exc))
    token = read_token(args.token_file, args.token_fd)
    if os.getpid() == 1:
        init_status = run_as_init()
        if init_status is not None:
            return init_status
    threading.stack_size(THREAD_STACK_BYTES)
    log = Log()
    for warning in identity.warnings:
        log.write("execd: warning: %s" % warning)

    # The workspace and the shell's state files belong to the commands.
    identity.act_as_commands()
    try:
        os.makedirs(args.root, exist_ok=True)
    except OSError as exc:
        fail("cannot create --root %s: %s" % (args.root, exc))
    root = os.path.realpath(args.root)
    if not os.path.isdir(root):
        fail("--root %s is not a directory" % args.root)
    state_dir = private_state_dir(root)
    home = os.environ.get("HOME", "")
    if home.startswith("/"):
        # Tools write caches and user installs there; it may sit on a fresh tmpfs.
        with contextlib.suppress(OSError):
            os.makedirs(home, 0o700, exist_ok=True)
    identity.act_as_server()

    session = Session(root, shell_env(token), state_dir, args.command_user)
    app = App(root, token, session, args.max_body_bytes, log)
    # SIGTERM/SIGINT only wake the main thread through the wakeup pipe, as /shutdown does.
    signal.set_wakeup_fd(app.stopper.write_fd)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    if args.parent_fd is not None:
        try:
            os.set_inheritable(args.parent_fd, False)  # the server's alone, not the commands'
        except OSError as exc:
            fail("--parent-fd %d: %s" % (args.parent_fd, exc))
        threading.Thread(
            target=watch_parent, args=(args.parent_fd, app.stopper, log), daemon=True
        ).start()

    handler = partial(Handler, app=app)
    servers: List[socketserver.BaseServer] = []
    port: Optional[int] = None
    sock_path: Optional[str] = None
    sock_ino = 0

    # Listening sockets close with the process; closing them under serve_forever makes it spin.
    def cleanup() -> None:
        identity.act_as_commands()
        session.close()
        identity.act_as_server()
        if sock_path is not None:
            with contextlib.suppress(OSError):
                if os.lstat(sock_path).st_ino == sock_ino:
                    os.unlink(sock_path)

    try:
        if args.port is not None:
            cls = TCP6Server if ":" in args.host else TCPServer
            tcp = cls((args.host, args.port), handler)
            port = tcp.server_address[1]
            servers.append(tcp)
        if args.unix_socket is not None:
            unix, sock_ino = bind_unix(os.path.abspath(args.unix_socket), handler)
            sock_path = os.path.abspath(args.unix_socket)
            servers.append(unix)
        if args.listen_fd is not None:
            servers.append(inherited_unix_server(args.listen_fd, handler))
    except OSError as exc:
        cleanup()
        fail("cannot listen: %s" % exc, 1)

    # Listening: connections wait in the backlog until the threads started below accept them.
    info = {
        "pid": os.getpid(),
        "port": port,
        "unix_socket": sock_path,
        "root": root,
        "version": __version__,
    }
    try:
        if args.ready_file is not None:
            write_ready_file(args.ready_file, info)
        if args.ready_fd is not None:
            write_ready_fd(args.ready_fd, info)
    except OSError as exc:
        cleanup()
        fail("cannot report readiness: %s" % exc, 1)
    # Threads inherit the file-system ids of the thread that starts them: every request thread
    # and the shell's threads act on files as the command user.
    identity.act_as_commands()
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    # The first command waits for the shell if it comes before the shell is up.
    threading.Thread(
        target=start_session, args=(session, log), name="execd-start", daemon=True
    ).start()
    user = args.command_user
    log.write(
        "execd %s listening (port=%s unix_socket=%s root=%s commands as %s)"
        % (__version__, port, sock_path, root, "%d:%d" % user if user else "this user")
    )

    app.stopper.wait()
    cleanup()
    log.flush(1.0)
    return 0


if __name__ == "__main__":
    exit_code = main()
    # Skip interpreter teardown: request threads may still be running and have nothing to finish.
    os._exit(exit_code)
