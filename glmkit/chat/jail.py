"""The python tool's jail: how a sandboxed kernel is confined, for `glmkit.chat.sandbox.Sandbox`.

`bwrap_argv` is the bubblewrap command, `launcher_argv` the program it runs (set the rlimits, drop to
the sandbox uid, become the kernel), `kernel_env` the kernel's whole environment, `UidLease` one
sandbox uid held across processes, `etc_files` that uid's passwd / group / hosts, and `kill_uid`
ends every process of a uid. `sandbox_problem` says why this machine cannot build the jail, once per
process, by starting a probe. Everything here takes plain values; the kernel itself, its client and
the per-call limits live in `glmkit.chat.sandbox`.

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
- rlimits, set by the launcher before it drops to the uid: address space, file size, CPU time, no
  core files, and (for the uid) the number of tasks.

The host needs Linux, root, bubblewrap and a Python that the sandbox user can read with ipykernel
and matplotlib-inline installed (Debian's python3 + python3-ipykernel: scripts/setup_sandbox.sh).
"""
from __future__ import annotations

import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from glmkit.errors import GlmkitError

SANDBOX_PYTHON = "/usr/bin/python3"  # Debian's, outside root's home (see scripts/setup_sandbox.sh)
UID_BASE = 900_000  # sandbox uids: no account uses them; each sandbox leases one
UID_COUNT = 1000
LOCK_DIR = Path("/run/glmkit-sandbox")  # root-only: uid leases and the synthetic /etc files
# /etc files that Python, numpy and matplotlib read; nothing else of /etc is visible
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/matplotlibrc", "/etc/fonts", "/etc/nsswitch.conf", "/etc/alternatives")

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


def launcher_argv(python: str, uid: int, memory_bytes: int, max_processes: int, max_file_bytes: int,
                  max_cpu_s: int, args: list[str]) -> list[str]:
    """`python` running the launcher: the limits set, `uid` taken (-1: the current user's kept),
    then `python -m ipykernel_launcher ARGS` (or, with args ["--probe"], a check that it could)."""
    return [python, "-c", _LAUNCHER, str(uid), str(uid), str(memory_bytes), str(max_processes),
            str(max_file_bytes), str(max_cpu_s), *args]


@functools.cache
def python_prefixes(python: str) -> tuple[str, ...]:
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
    nobody = UID_BASE + UID_COUNT  # outside the leased range: no sandbox runs as it
    probe = bwrap_argv(python_prefixes(python)) + launcher_argv(python, nobody, 1 << 30, 64, 1 << 20, 60,
                                                                ["--probe"])
    out = subprocess.run(probe, capture_output=True, text=True, timeout=120, env=kernel_env(Path("/"), Path("/")))
    if out.returncode != 0:
        return f"a probe sandbox failed: {out.stderr.strip()[-800:]}"
    return None


def bwrap_argv(prefixes: tuple[str, ...], workspace: Path | None = None, etc_dir: Path | None = None) -> list[str]:
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


def kernel_env(workspace: Path, kernel_dir: Path) -> dict[str, str]:
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


def pids_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except FileNotFoundError:
                pass
    return pids


def kill_uid(uid: int, deadline_s: float = 10.0) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb keeps forking meanwhile)."""
    end = time.monotonic() + deadline_s
    while pids := pids_of(uid):
        if time.monotonic() > end:
            raise GlmkitError(f"processes {pids[:10]} of sandbox uid {uid} survive SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


class UidLease:
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
        """Give the uid back, and remove its /etc files (`etc_files`)."""
        shutil.rmtree(LOCK_DIR / f"etc-{self.uid}", ignore_errors=True)
        os.close(self._fd)


def etc_files(uid: int, workspace: Path) -> Path:
    """passwd, group and hosts for the sandbox of `uid`, in the root-only lock folder."""
    etc = LOCK_DIR / f"etc-{uid}"
    etc.mkdir(mode=0o755, exist_ok=True)
    (etc / "passwd").write_text(f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
                                f"sandbox:x:{uid}:{uid}:sandbox:{workspace}:/bin/sh\n")
    (etc / "group").write_text(f"root:x:0:\nsandbox:x:{uid}:\n")
    (etc / "hosts").write_text("127.0.0.1 localhost sandbox\n::1 localhost\n")
    for name in ("passwd", "group", "hosts"):
        os.chmod(etc / name, 0o644)
    return etc
