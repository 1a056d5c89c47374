"""The `python` tool's interpreter: one stateful IPython kernel per conversation, in a sandbox.

`Sandbox(workspace, limits).run(code)` runs code in a kernel whose variables persist between calls
and returns an `ExecResult` (stdout, stderr, the last expression's value, the error's traceback,
matplotlib figures saved as PNG files in the workspace); `ExecResult.as_observation()` is the text
the model reads. `SandboxPool` keeps one sandbox per conversation id and closes idle ones.

The sandbox, and its limits (fields of `Limits`, defaults in brackets):
- no network: the kernel has its own network namespace (with a private loopback device only), so
  no socket reaches the host's 127.0.0.1, any other host or the internet. Jupyter's channels are Unix
  sockets (the IPC transport) in the workspace's `.kernel/` folder.
- an unprivileged user: bubblewrap, started as root, creates the namespaces (mount, pid, net, ipc,
  uts) first; then the kernel drops to a uid of its own (one per sandbox, leased from
  `UID_BASE`..`UID_BASE + UID_COUNT`), with no capabilities and no_new_privs, before any user code
  runs (an unprivileged user cannot create the namespaces itself on these machines).
- files: the host's /usr (the kernel's Python, its standard library and dist-packages) and the
  Python's own prefix read-only, a few files of /etc that programs need (and a synthetic passwd,
  group and hosts), a private /proc and a minimal /dev. The workspace, bound at its own path, is the
  only writable place (also HOME and TMPDIR). /root, /home, the project's checkout, /etc/shadow and
  every other host path do not exist inside.
- memory: RLIMIT_AS [1024 MiB] on the kernel: a larger allocation raises MemoryError in the kernel,
  which keeps running.
- processes: RLIMIT_NPROC [64 tasks, threads included] for the sandbox's uid; a call after which the
  uid holds more than half of them (a fork bomb) restarts the kernel, which ends them all.
- file size: RLIMIT_FSIZE [64 MiB] on every file the kernel writes. The total size of the workspace
  is not limited.
- CPU time: RLIMIT_CPU [600 s] on each process over its whole life: it bounds a process left running
  in the background, and a kernel that reaches it exits and is restarted.
- output: stdout + stderr kept per call [20,000 characters], the rest dropped with a note (the
  kernel drops it already, so a 100 MB print costs neither side much); at most [8] images per call.
- wall time per call [30 s]: then the kernel is interrupted (KeyboardInterrupt, state kept); if it
  is not idle within `interrupt_grace_s` [2 s], it is killed with every process it started and a
  fresh kernel replaces it: its variables are lost, the result says `restarted`, and the
  conversation continues. A kernel that exits is restarted the same way.

The host needs Linux, root, bubblewrap and a Python that the sandbox user can read with ipykernel
and matplotlib-inline installed (Debian's python3 + python3-ipykernel: scripts/setup_sandbox.sh).
Where any is missing `Sandbox` raises a GlmkitError naming it, unless `allow_unsandboxed=True`: then
the kernel runs as the current user with the host's Python and file system, with only the memory,
file size, output and time limits.
"""
from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmkit.errors import GlmkitError

SANDBOX_PYTHON = "/usr/bin/python3"  # Debian's, outside root's home (see scripts/setup_sandbox.sh)
UID_BASE = 900_000  # sandbox uids: no account uses them; each sandbox leases one
UID_COUNT = 1000
LOCK_DIR = Path("/run/glmkit-sandbox")  # root-only: uid leases and the synthetic /etc files
KERNEL_DIR = ".kernel"  # inside the workspace: connection file, IPC sockets, IPython state, log
FIGURE_DIR = "figures"  # inside the workspace
# /etc files that Python, numpy and matplotlib read; nothing else of /etc is visible
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/matplotlibrc", "/etc/fonts", "/etc/nsswitch.conf", "/etc/alternatives")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Run by the kernel's Python as root inside the namespaces: set the limits, drop to the sandbox
# uid (a uid of -1: stay the current user, the unsandboxed mode), then become the kernel.
_LAUNCHER = """
import os, resource, sys
uid, gid, memory, nproc, fsize, cpu = (int(a) for a in sys.argv[1:7])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if uid >= 0:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.chdir(os.environ["HOME"])  # the workspace, closed to root without capabilities
if sys.argv[7:] == ["--probe"]:
    import importlib.util, ipykernel
    sys.exit(importlib.util.find_spec("matplotlib_inline") is None and "matplotlib_inline is not installed")
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher"] + sys.argv[7:])
"""

# An IPython start-up file: drop a cell's output beyond the limit in the kernel, before it is sent.
# It only spares work (the code may undo it); the host enforces the limit on what it receives.
_OUTPUT_CAP = """
import sys


def _glmkit_cap_output(limit):
    written = [0]

    def cap(stream):
        write = stream.write

        def capped_write(text):
            room = limit - written[0]
            written[0] += len(text)
            if room > 0:
                write(text[:room])
            return len(text)
        stream.write = capped_write

    cap(sys.stdout)
    cap(sys.stderr)
    get_ipython().events.register("pre_run_cell", lambda *args: written.__setitem__(0, 0))


_glmkit_cap_output({limit})
del _glmkit_cap_output
"""


@dataclass(frozen=True)
class Limits:
    """What one sandboxed kernel may use; see the module docstring for how each is enforced."""
    timeout_s: float = 30.0  # wall time per call
    memory_mb: int = 1024  # address space of the kernel (RLIMIT_AS)
    max_processes: int = 64  # tasks (processes and threads) of the sandbox uid (RLIMIT_NPROC)
    max_file_mb: int = 64  # size of any file written (RLIMIT_FSIZE)
    max_cpu_s: int = 600  # CPU seconds of each process over its life, the kernel's included (RLIMIT_CPU)
    max_output_chars: int = 20_000  # stdout + stderr kept per call
    max_images: int = 8  # images saved per call
    interrupt_grace_s: float = 2.0  # after the interrupt, wait this long before restarting
    startup_timeout_s: float = 60.0  # a kernel not answering by then is a failed start

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise GlmkitError(f"sandbox limit {name} must be positive, got {value!r}")


@dataclass
class ExecResult:
    """What one call of the interpreter produced."""
    stdout: str = ""
    stderr: str = ""
    value: str | None = None  # text/plain of the last expression's value (None: no value)
    error: str | None = None  # the traceback as plain text
    images: list[Path] = field(default_factory=list)  # PNG files in the workspace
    truncated: bool = False  # output beyond Limits.max_output_chars was dropped
    timed_out: bool = False  # the call ran past its wall time and was interrupted
    restarted: bool = False  # the kernel was replaced by a fresh one: earlier variables are lost
    notes: list[str] = field(default_factory=list)  # what the sandbox did, for the model to read

    def as_observation(self, max_chars: int = 4000) -> str:
        """The text the model sees: output, value, error, image paths and the sandbox's notes, cut
        in the middle to `max_chars` (the head and the tail, where tracebacks end, are kept)."""
        parts = [self.stdout.rstrip("\n")] if self.stdout else []
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        if self.value is not None:
            parts.append(self.value)
        if self.error:
            parts.append(self.error.rstrip("\n"))
        parts += [f"[image saved: {path}]" for path in self.images]
        parts += [f"[{note}]" for note in self.notes]
        text = "\n".join(parts) if parts else "[no output]"
        if len(text) <= max_chars:
            return text
        marker = f"\n[... {{}} of {len(text)} characters omitted ...]\n"
        keep = max(max_chars - len(marker) - 8, 0)
        head, tail = keep * 2 // 3, keep - keep * 2 // 3
        return text[:head] + marker.format(len(text) - head - tail) + text[len(text) - tail:]


@functools.cache
def _python_prefixes(python: str) -> tuple[str, ...]:
    """The real folders of `python`'s installation that lie outside /usr (a venv, /opt/...)."""
    out = subprocess.run([python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise GlmkitError(f"the sandbox Python {python} does not run: {out.stderr.strip()[-500:]}")
    roots = {os.path.realpath(line) for line in out.stdout.split()}
    return tuple(sorted(r for r in roots if not (r == "/usr" or r.startswith("/usr/"))))


def _private_ancestor(path: str) -> str | None:
    """The first folder above `path` that other users cannot enter, if any."""
    parts = Path(os.path.realpath(path)).parents
    for folder in reversed(parts):
        if os.stat(folder).st_mode & 0o001 == 0:
            return str(folder)
    return None


@functools.cache
def sandbox_problem(python: str = SANDBOX_PYTHON) -> str | None:
    """Why a sandbox cannot be built on this machine (None: it can). Starts a probe sandbox once."""
    if not sys.platform.startswith("linux"):
        return "the sandbox needs Linux namespaces"
    try:
        import jupyter_client  # noqa: F401
    except ImportError:
        return "jupyter_client is not installed (pip install 'glmkit[tools]')"
    if os.geteuid() != 0:
        return ("the sandbox must start as root, to create namespaces and then drop to an unprivileged "
                "uid (run glmkit as root, e.g. in a container)")
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap, or run scripts/setup_sandbox.sh)"
    if not os.access(python, os.X_OK):
        return (f"the sandbox Python {python} does not exist (apt-get install python3 python3-ipykernel "
                "python3-matplotlib-inline, or run scripts/setup_sandbox.sh)")
    folder = _private_ancestor(python)
    if folder is not None:
        return f"the sandbox Python {python} is inside {folder}, which the sandbox user cannot enter"
    probe = _bwrap_argv(_python_prefixes(python)) + [
        python, "-c", _LAUNCHER, str(UID_BASE + UID_COUNT), str(UID_BASE + UID_COUNT), str(1 << 30), "64", str(1 << 20),
        "60", "--probe"]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=120, env=_kernel_env(Path("/"), Path("/")))
    if out.returncode != 0:
        return f"a probe sandbox failed: {out.stderr.strip()[-800:]}"
    return None


def _bwrap_argv(prefixes: tuple[str, ...], workspace: Path | None = None, etc_dir: Path | None = None) -> list[str]:
    """The bubblewrap command that runs a program in the sandbox (without the program)."""
    argv = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session",
            # the launcher needs these two to drop to the sandbox uid; setuid clears them all
            "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /lib -> usr/lib
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for prefix in prefixes:
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--perms", "0755", "--dir", "/etc"]  # made 0700 otherwise, closed to the sandbox uid
    for path in ETC_FILES:
        argv += ["--ro-bind-try", path, path]
    if etc_dir is not None:
        for name in ("passwd", "group", "hosts"):
            argv += ["--ro-bind", str(etc_dir / name), f"/etc/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if workspace is not None:
        for folder in list(reversed(workspace.parents))[1:]:  # bubblewrap would make them 0700
            argv += ["--perms", "0755", "--dir", str(folder)]
        argv += ["--bind", str(workspace), str(workspace)]
    return argv + ["--"]


def _kernel_env(workspace: Path, kernel_dir: Path) -> dict[str, str]:
    """The kernel's whole environment: nothing of the host's (tokens, paths) is passed on."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workspace), "TMPDIR": str(workspace),
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            # caches outlive a restart (matplotlib's font list takes a second or more to build)
            "MPLCONFIGDIR": str(workspace / ".cache" / "matplotlib"), "XDG_CACHE_HOME": str(workspace / ".cache"),
            "IPYTHONDIR": str(kernel_dir / "ipython"), "XDG_CONFIG_HOME": str(kernel_dir / "config"),
            # one thread per library and two malloc arenas keep the address space within RLIMIT_AS
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2"}


def _pids_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except FileNotFoundError:
                pass
    return pids


def _kill_uid(uid: int, deadline_s: float = 10.0) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb keeps forking meanwhile)."""
    end = time.monotonic() + deadline_s
    while pids := _pids_of(uid):
        if time.monotonic() > end:
            raise GlmkitError(f"processes {pids[:10]} of sandbox uid {uid} survive SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


class _UidLease:
    """An exclusive hold on one sandbox uid, across processes: a flock on /run/glmkit-sandbox/uid-N."""

    def __init__(self, base: int, count: int):
        LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        for uid in range(base, base + count):
            fd = os.open(LOCK_DIR / f"uid-{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise GlmkitError(f"all {count} sandbox uids from {base} are in use: close idle sandboxes first")

    def release(self) -> None:
        os.close(self._fd)


class Sandbox:
    """A stateful IPython kernel for one conversation, confined as the module docstring says.

    The kernel starts in the constructor (about two seconds); `run` is serialised by a lock; `reset`
    replaces the kernel by a fresh one; `close` ends the kernel and every process it started. Both
    keep the workspace's files.
    """

    def __init__(self, workspace: Path, limits: Limits = Limits(), *, allow_unsandboxed: bool = False,
                 python: str = SANDBOX_PYTHON):
        problem = sandbox_problem(python)
        if problem is not None and not allow_unsandboxed:
            raise GlmkitError(f"cannot sandbox the python tool: {problem}. Fix that, or pass "
                              "allow_unsandboxed=True (--unsafe-python) to run its code without isolation")
        self.sandboxed = problem is None
        self.workspace = Path(workspace).absolute()
        self.limits = limits
        self._python = python if self.sandboxed else sys.executable
        self._kernel_dir = self.workspace / KERNEL_DIR
        if len(str(self._kernel_dir / "ipc-5")) > 100:  # a Unix socket path holds 107 bytes
            raise GlmkitError(f"workspace path {self.workspace} is too long for the kernel's sockets; "
                              "use a folder with a path under 80 characters")
        self._lock = threading.Lock()
        self._lease = _UidLease(UID_BASE, UID_COUNT) if self.sandboxed else None
        self._proc: subprocess.Popen | None = None
        self._client = None
        self._images_saved = 0
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @property
    def uid(self) -> int | None:
        return self._lease.uid if self._lease else None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the kernel's life ---------------------------------------------------------------------

    def _start(self) -> None:
        if self.uid is not None:
            _kill_uid(self.uid)  # anything a crashed earlier holder of this uid left behind
        self._prepare_workspace()
        key = secrets.token_hex(32)
        info = {"transport": "ipc", "ip": str(self._kernel_dir / "ipc"), "shell_port": 1, "iopub_port": 2,
                "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": key,
                "signature_scheme": "hmac-sha256", "kernel_name": "glmkit-sandbox"}
        connection = self._kernel_dir / "connection.json"
        connection.write_text(json.dumps(info))
        log = open(self._kernel_dir / "kernel.log", "wb")
        uid = self.uid if self.uid is not None else -1
        launch = [self._python, "-c", _LAUNCHER, str(uid), str(uid), str(self.limits.memory_mb << 20),
                  str(self.limits.max_processes), str(self.limits.max_file_mb << 20), str(self.limits.max_cpu_s),
                  "-f", str(connection), "--HistoryManager.enabled=False", "--InteractiveShell.colors=NoColor"]
        if self.sandboxed:
            launch = _bwrap_argv(_python_prefixes(self._python), self.workspace, self._etc_dir()) + launch
        for path in (self.workspace, self._kernel_dir, connection, log.name):
            self._own(path)
        with log:
            self._proc = subprocess.Popen(launch, env=_kernel_env(self.workspace, self._kernel_dir),
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.workspace, start_new_session=True)
        from jupyter_client import BlockingKernelClient
        self._client = BlockingKernelClient()
        self._client.load_connection_info(info)
        self._client.start_channels()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until the kernel answers a kernel_info request on IOPub: a reply on the shell channel
        alone does not show that IOPub's subscription is live, and a call's output could be lost."""
        deadline = time.monotonic() + self.limits.startup_timeout_s
        while time.monotonic() < deadline and self._proc.poll() is None:
            msg_id = self._client.kernel_info()
            try:
                while True:
                    msg = self._client.get_iopub_msg(timeout=0.5)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        return
            except queue.Empty:
                pass
        log = (self._kernel_dir / "kernel.log").read_text(errors="replace")[-2000:]
        status = self._proc.poll()
        self._stop()
        raise GlmkitError(f"the python sandbox's kernel did not start within {self.limits.startup_timeout_s} s"
                          f" (exit status {status}); its log: {log.strip() or '(empty)'}")

    def _prepare_workspace(self) -> None:
        """A fresh `.kernel/` folder, and the workspace owned by the sandbox uid (a workspace made
        by an earlier sandbox holds files of another uid). No process of the uid runs now, so the
        sandbox cannot race these changes."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workspace, 0o700)
        if self._kernel_dir.is_symlink():
            self._kernel_dir.unlink()
        elif self._kernel_dir.exists():
            shutil.rmtree(self._kernel_dir)  # does not follow symbolic links inside
        startup = self._kernel_dir / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True)
        # a little over the host's limit, so that the host sees the overflow and says so
        (startup / "00-glmkit-output-cap.py").write_text(
            _OUTPUT_CAP.format(limit=self.limits.max_output_chars + 1000))
        if self.uid is not None:
            for folder, dirs, files in os.walk(self.workspace):
                for name in dirs + files:
                    os.chown(os.path.join(folder, name), self.uid, self.uid, follow_symlinks=False)

    def _etc_dir(self) -> Path:
        """passwd, group and hosts for the sandbox, in the root-only lock folder."""
        etc = LOCK_DIR / f"etc-{self.uid}"
        etc.mkdir(mode=0o755, exist_ok=True)
        (etc / "passwd").write_text(f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
                                    f"sandbox:x:{self.uid}:{self.uid}:sandbox:{self.workspace}:/bin/sh\n")
        (etc / "group").write_text(f"root:x:0:\nsandbox:x:{self.uid}:\n")
        (etc / "hosts").write_text("127.0.0.1 localhost sandbox\n::1 localhost\n")
        for name in ("passwd", "group", "hosts"):
            os.chmod(etc / name, 0o644)
        return etc

    def _own(self, path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.uid, follow_symlinks=False)

    def _stop(self) -> None:
        """End the kernel and every process it started (the pid namespace dies with bubblewrap)."""
        if self._client is not None:
            self._client.stop_channels()
            self._client = None
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
            self._proc = None  # its pid, and so its process group's id, may be reused now
        if self.uid is not None:
            _kill_uid(self.uid)

    def _restart(self, result: ExecResult, why: str) -> None:
        self._stop()
        self._start()
        result.restarted = True
        result.notes.append(f"{why}; the interpreter was restarted and its variables are lost")

    def reset(self) -> None:
        """A fresh kernel: every variable and process of the old one is gone, the files stay."""
        with self._lock:
            if self._client is None:
                raise GlmkitError("this sandbox is closed; make a new one")
            self._stop()
            self._start()

    def close(self) -> None:
        """End the kernel and release its uid; the workspace's files stay."""
        with self._lock:
            self._stop()
            if self._kernel_dir.is_dir() and not self._kernel_dir.is_symlink():
                shutil.rmtree(self._kernel_dir, ignore_errors=True)
            if self._lease is not None:
                shutil.rmtree(LOCK_DIR / f"etc-{self._lease.uid}", ignore_errors=True)
                self._lease.release()
                self._lease = None

    # -- one call -----------------------------------------------------------------------------

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        """Run `code` in the kernel; never raises for anything the code does."""
        timeout = self.limits.timeout_s if timeout is None else timeout
        with self._lock:
            if self._client is None:
                raise GlmkitError("this sandbox is closed; make a new one")
            result = ExecResult()
            # stop_on_error=False: else the kernel aborts a request that follows an error too soon
            msg_id = self._client.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
            done = self._collect(msg_id, result, time.monotonic() + timeout)
            if done is False:
                result.timed_out = True
                result.notes.append(f"the code ran past the {timeout:g} s time limit and was interrupted")
                self._client.control_channel.send(self._client.session.msg("interrupt_request", {}))
                done = self._collect(msg_id, result, time.monotonic() + self.limits.interrupt_grace_s)
                if done is False:
                    self._restart(result, "the interrupted code did not stop")
            if done is None:
                self._restart(result, "the interpreter exited")
            elif self.uid is not None and len(_pids_of(self.uid)) > 1 + self.limits.max_processes // 2:
                self._restart(result, f"the code left {len(_pids_of(self.uid))} processes running")
            else:
                self._discard_shell_replies()
            return result

    def _discard_shell_replies(self) -> None:
        """The shell channel's replies (execute_reply) repeat what IOPub said; drop them."""
        try:
            while True:
                self._client.get_shell_msg(timeout=0)
        except queue.Empty:
            pass

    def _collect(self, msg_id: str, result: ExecResult, deadline: float) -> bool | None:
        """Read the call's messages into `result` until the kernel is idle (True), the deadline
        passes (False) or the kernel dies (None)."""
        while True:
            try:
                msg = self._client.get_iopub_msg(timeout=max(min(0.2, deadline - time.monotonic()), 0.001))
            except queue.Empty:
                if self._proc.poll() is not None:
                    return None
                if time.monotonic() >= deadline:
                    return False
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue  # an earlier call's late output, or a forked child's
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return True
            if kind == "stream":
                self._add_output(result, content["name"], content["text"])
            elif kind == "execute_result":
                result.value = self._clip(result, content["data"].get("text/plain", ""))
            elif kind == "display_data":
                self._add_display(result, content["data"])
            elif kind == "error":
                result.error = self._clip(result, _ANSI.sub("", "\n".join(content["traceback"])))

    def _add_output(self, result: ExecResult, stream: str, text: str) -> None:
        room = self.limits.max_output_chars - len(result.stdout) - len(result.stderr)
        if len(text) > room:
            text = text[:max(room, 0)]
            if not result.truncated:
                result.truncated = True
                result.notes.append(f"output truncated: only the first {self.limits.max_output_chars} "
                                    "characters are kept")
        if stream == "stderr":
            result.stderr += text
        else:
            result.stdout += text

    def _clip(self, result: ExecResult, text: str) -> str:
        if len(text) <= self.limits.max_output_chars:
            return text
        result.truncated = True
        return text[:self.limits.max_output_chars] + f"\n[... {len(text) - self.limits.max_output_chars} characters dropped]"

    def _add_display(self, result: ExecResult, data: dict) -> None:
        if "image/png" not in data:
            self._add_output(result, "stdout", data.get("text/plain", "") + "\n")
        elif len(result.images) >= self.limits.max_images:
            if not any(n.startswith("more images") for n in result.notes):
                result.notes.append(f"more images than {self.limits.max_images} in one call were not saved")
        else:
            png = base64.b64decode(data["image/png"])
            if len(png) <= self.limits.max_file_mb << 20:
                result.images.append(self._save_image(png))

    def _save_image(self, png: bytes) -> Path:
        """Write a figure to figures/figure-NNN.png. The workspace belongs to the sandbox user, so
        no symbolic link it plants is followed (every component opened with O_NOFOLLOW)."""
        ws = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                os.mkdir(FIGURE_DIR, 0o755, dir_fd=ws)
                os.chown(FIGURE_DIR, *(2 * [self.uid if self.uid is not None else -1]), dir_fd=ws)
            except FileExistsError:
                pass
            folder = os.open(FIGURE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=ws)
            try:
                while True:
                    self._images_saved += 1
                    name = f"figure-{self._images_saved:03d}.png"
                    try:
                        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
                        break
                    except FileExistsError:
                        continue
                with os.fdopen(fd, "wb") as f:
                    if self.uid is not None:
                        os.fchown(f.fileno(), self.uid, self.uid)
                    f.write(png)
            finally:
                os.close(folder)
        finally:
            os.close(ws)
        return self.workspace / FIGURE_DIR / name


class SandboxPool:
    """One `Sandbox` per conversation id, made on first use in `root/<id>`, closed after
    `idle_timeout_s` without a call (checked on every `get`, or by calling `close_idle`)."""

    def __init__(self, root: Path, limits: Limits = Limits(), *, idle_timeout_s: float = 900.0,
                 allow_unsandboxed: bool = False, python: str = SANDBOX_PYTHON):
        self.root, self.limits, self.idle_timeout_s = Path(root), limits, idle_timeout_s
        self._options = {"allow_unsandboxed": allow_unsandboxed, "python": python}
        self._lock = threading.Lock()
        self._sandboxes: dict[str, Sandbox] = {}
        self._last_used: dict[str, float] = {}

    def get(self, conversation_id: str) -> Sandbox:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}", conversation_id):
            raise GlmkitError(f"conversation id {conversation_id!r} must be 1-64 letters, digits, '_', '-' or "
                              "'.' (not starting with '.')")
        self.close_idle()
        with self._lock:
            self._last_used[conversation_id] = time.monotonic()
            if conversation_id not in self._sandboxes:
                self._sandboxes[conversation_id] = Sandbox(self.root / conversation_id, self.limits,
                                                           **self._options)
            return self._sandboxes[conversation_id]

    def run(self, conversation_id: str, code: str, timeout: float | None = None) -> ExecResult:
        result = self.get(conversation_id).run(code, timeout)
        self._last_used[conversation_id] = time.monotonic()
        return result

    def close_idle(self) -> list[str]:
        """Close the sandboxes idle for longer than the timeout; returns their conversation ids."""
        now = time.monotonic()
        with self._lock:
            idle = [c for c, t in self._last_used.items()
                    if now - t > self.idle_timeout_s and not self._sandboxes[c]._lock.locked()]
            closing = [self._sandboxes.pop(c) for c in idle]
            for c in idle:
                del self._last_used[c]
        for sandbox in closing:
            sandbox.close()
        return idle

    def close(self, conversation_id: str) -> None:
        with self._lock:
            sandbox = self._sandboxes.pop(conversation_id, None)
            self._last_used.pop(conversation_id, None)
        if sandbox is not None:
            sandbox.close()

    def close_all(self) -> None:
        for conversation_id in list(self._sandboxes):
            self.close(conversation_id)
