"""The `python` tool's interpreter: one stateful IPython kernel per conversation, in a sandbox.

`Sandbox(workspace, limits).run(code)` runs code in a kernel whose variables persist between calls
and returns an `ExecResult` (stdout, stderr, the last expression's value, the error's traceback,
matplotlib figures saved as PNG files in the workspace); `ExecResult.as_observation()` is the text
the model reads. `SandboxPool` keeps one sandbox per conversation id and closes idle ones.

The sandbox, and its limits (fields of `Limits`, defaults in brackets):
- isolation, built by `glmkit.chat.jail` (its docstring says how): no network (the kernel's own
  network namespace; Jupyter's channels are Unix sockets in the workspace's `.kernel/` folder), an
  unprivileged uid of its own without capabilities, and of the host's files only /usr, the Python's
  prefix and a few of /etc, read-only. The workspace is the only writable place (also HOME and TMPDIR).
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
and matplotlib-inline installed (Debian's python3 + python3-ipykernel: scripts/setup_sandbox.sh);
`sandbox_problem()` says which is missing. Where any is, `Sandbox` raises a GlmkitError naming it,
unless `allow_unsandboxed=True`: then the kernel runs as the current user with the host's Python and
file system, with only the memory, file size, output and time limits.
"""
from __future__ import annotations

import base64
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

from glmkit.chat.jail import (
    SANDBOX_PYTHON,
    UID_BASE,
    UID_COUNT,
    UidLease,
    bwrap_argv,
    etc_files,
    kernel_env,
    kill_uid,
    launcher_argv,
    pids_of,
    python_prefixes,
    sandbox_problem,
)
from glmkit.errors import GlmkitError

KERNEL_DIR = ".kernel"  # inside the workspace: connection file, IPC sockets, IPython state, log
FIGURE_DIR = "figures"  # inside the workspace
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

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
        self._lease = UidLease(UID_BASE, UID_COUNT) if self.sandboxed else None
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
            kill_uid(self.uid)  # anything a crashed earlier holder of this uid left behind
        self._prepare_workspace()
        key = secrets.token_hex(32)
        info = {"transport": "ipc", "ip": str(self._kernel_dir / "ipc"), "shell_port": 1, "iopub_port": 2,
                "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": key,
                "signature_scheme": "hmac-sha256", "kernel_name": "glmkit-sandbox"}
        connection = self._kernel_dir / "connection.json"
        connection.write_text(json.dumps(info))
        log = open(self._kernel_dir / "kernel.log", "wb")
        uid = self.uid if self.uid is not None else -1
        launch = launcher_argv(self._python, uid, self.limits.memory_mb << 20, self.limits.max_processes,
                               self.limits.max_file_mb << 20, self.limits.max_cpu_s,
                               ["-f", str(connection), "--HistoryManager.enabled=False",
                                "--InteractiveShell.colors=NoColor"])
        if self.sandboxed:
            etc = etc_files(self.uid, self.workspace)
            launch = bwrap_argv(python_prefixes(self._python), self.workspace, etc) + launch
        for path in (self.workspace, self._kernel_dir, connection, log.name):
            self._own(path)
        with log:
            self._proc = subprocess.Popen(launch, env=kernel_env(self.workspace, self._kernel_dir),
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
            kill_uid(self.uid)

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
            elif self.uid is not None and len(pids_of(self.uid)) > 1 + self.limits.max_processes // 2:
                self._restart(result, f"the code left {len(pids_of(self.uid))} processes running")
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
