"""The python tool's sandbox: the happy path, and every escape attempt contained.

Each escape test leaves the sandbox usable (its state kept, or the kernel restarted cleanly, which
loses the variables: the tests say which) and another conversation's kernel, and the host,
unaffected. The tests skip, with the reason, where the machine cannot build a sandbox (not root, no
bubblewrap, no Debian python3 with ipykernel: scripts/setup_sandbox.sh installs them).
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from glmkit.chat.sandbox import ExecResult, Limits, Sandbox, SandboxPool, sandbox_problem
from glmkit.errors import GlmkitError

REPO = Path(__file__).resolve().parents[1]
PROBLEM = sandbox_problem()
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=f"no sandbox on this machine: {PROBLEM}")
# small limits keep the suite fast; 768 MiB leaves room for numpy + matplotlib (~450 MiB mapped).
# Calls get 10 s (a loaded machine is slow); the tests of the wall-time limit pass 2 s.
LIMITS = Limits(timeout_s=10.0, memory_mb=768, max_processes=32, max_file_mb=8, max_output_chars=2000,
                interrupt_grace_s=2.0)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    with Sandbox(tmp_path_factory.mktemp("box") / "ws", LIMITS) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another conversation's kernel, with state that must survive every attack on `box`."""
    with Sandbox(tmp_path_factory.mktemp("other") / "ws", LIMITS) as sandbox:
        assert sandbox.run("keep = 'safe'").error is None
        yield sandbox


def processes_of(uid: int) -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) == uid)


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def assert_unaffected(box: Sandbox, other: Sandbox) -> None:
    """The attacked kernel answers, the other conversation kept its state, the host can fork."""
    assert box.run("6 * 7").value == "42"
    assert other.run("keep").value == "'safe'"
    assert processes_of(box.uid) == 1  # the kernel alone: nothing the attack started survives
    assert subprocess.run(["true"]).returncode == 0


def test_observation_text():
    result = ExecResult(stdout="a\n", stderr="w\n", value="3", images=[Path("/w/figures/figure-001.png")],
                        notes=["note"])
    assert result.as_observation() == "a\n[stderr]\nw\n3\n[image saved: /w/figures/figure-001.png]\n[note]"
    assert ExecResult().as_observation() == "[no output]"
    long = ExecResult(stdout="h" * 5000 + "t" * 5000).as_observation(max_chars=300)
    assert len(long) <= 300 and long.startswith("h" * 100) and long.endswith("t" * 50)
    assert "characters omitted" in long


def test_limits_must_be_positive():
    with pytest.raises(GlmkitError, match="timeout_s must be positive"):
        Limits(timeout_s=0)


def test_refuses_without_a_sandbox(tmp_path):
    with pytest.raises(GlmkitError, match="cannot sandbox the python tool: .*allow_unsandboxed=True"):
        Sandbox(tmp_path / "ws", LIMITS, python="/nonexistent/python3")


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import ipykernel, jupyter_client"]).returncode != 0,
                    reason="ipykernel and jupyter_client are not installed (pip install 'glmkit[tools]')")
def test_unsandboxed_runs_when_asked(tmp_path):
    with Sandbox(tmp_path / "ws", LIMITS, python="/nonexistent/python3", allow_unsandboxed=True) as sandbox:
        assert not sandbox.sandboxed
        assert sandbox.run("x = 20").error is None
        assert sandbox.run("x + 1").value == "21"


@needs_sandbox
def test_state_value_streams_and_errors(box):
    assert box.run("x = 41").as_observation() == "[no output]"
    assert box.run("x + 1").value == "42"
    result = box.run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (result.stdout, result.stderr, result.value) == ("out\n", "err\n", None)
    error = box.run("1 / 0").error
    assert error.startswith("----") and error.endswith("ZeroDivisionError: division by zero")
    assert "\x1b[" not in error  # plain text, no terminal colours
    assert box.run("x").value == "41"


@needs_sandbox
def test_runs_as_an_unprivileged_user_without_capabilities(box):
    assert box.run("import os; os.getuid(), os.getgid(), os.getgroups()").value == f"({box.uid}, {box.uid}, [])"
    status = "[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))]"
    assert box.run(status).value == "['0000000000000000', '0000000000000000', '1']"


@needs_sandbox
def test_host_environment_is_not_passed_on(box):
    assert "PATH" in os.environ  # the host's; PYTHONPATH, tokens and the like are not passed on either
    kernel_env = box.run("import os\nsorted(os.environ)").value
    assert "PYTHONPATH" not in kernel_env and "VIRTUAL_ENV" not in kernel_env
    assert box.run("print(os.environ['HOME'], os.environ['TMPDIR'], os.getcwd())").stdout == f"{box.workspace} " * 2 + f"{box.workspace}\n"


@needs_sandbox
def test_matplotlib_figure_saved_as_png_in_the_workspace(box):
    # the first import builds matplotlib's font cache, which takes seconds on a loaded machine
    result = box.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()", timeout=60)
    assert result.error is None and len(result.images) == 1
    image = result.images[0]
    assert image.parent == box.workspace / "figures" and image.name.startswith("figure-")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"[image saved: {image}]" in result.as_observation()
    assert os.stat(image).st_uid == box.uid  # the sandbox may read and delete its own figures


@needs_sandbox
def test_writes_only_in_the_workspace(box, other):
    assert box.run("open('notes.txt', 'w').write('kept')").value == "4"
    assert (box.workspace / "notes.txt").read_text() == "kept"
    # /tmp exists inside only as a parent of a workspace under /tmp (root's, not writable)
    for path, error in [("/usr/escape.txt", "Read-only file system"), ("/etc/escape.txt", "Permission denied"),
                        ("/tmp/escape.txt", "Permission denied|No such file"), (f"{REPO}/escape.txt", "No such file"),
                        (f"{other.workspace}/escape.txt", "No such file")]:
        result = box.run(f"open({path!r}, 'w').write('x')")
        assert re.search(error, result.error.splitlines()[-1]), path
        assert not Path(path).exists()
    assert_unaffected(box, other)


@needs_sandbox
@pytest.mark.parametrize("path", ["/etc/shadow", "/root", "/root/.bashrc", str(REPO / "pyproject.toml")])
def test_secrets_home_and_project_are_not_visible(box, other, path):
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist on this host")
    result = box.run(f"import os\nos.stat({path!r})")
    assert result.error.endswith(f"FileNotFoundError: [Errno 2] No such file or directory: {path!r}")
    assert_unaffected(box, other)


@needs_sandbox
def test_no_network_to_the_host_or_beyond(box, other):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    result = box.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                     "s.sendall(b'secret')")
    assert "ConnectionRefusedError" in result.error  # its own loopback has no such listener
    result = box.run("socket.create_connection(('1.1.1.1', 53), timeout=1)")
    assert "Network is unreachable" in result.error
    assert box.run("import os; sorted(os.listdir('/sys/class/net')) if os.path.exists('/sys/class/net') "
                   "else open('/proc/net/dev').read().count(':')").value in ("['lo']", "1")
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):  # no connection ever reached the host's listener
        server.accept()
    server.close()
    assert_unaffected(box, other)


@needs_sandbox
def test_limits_are_set_in_the_kernel(box):
    code = ("import resource\n[resource.getrlimit(getattr(resource, 'RLIMIT_' + name))[0] for name in "
            "('AS', 'NPROC', 'FSIZE', 'CPU', 'CORE')]")
    assert box.run(code).value == f"[{768 << 20}, 32, {8 << 20}, 600, 0]"


@needs_sandbox
def test_allocating_8_gb_raises_memory_error(box, other):
    box.run("x = 5")
    result = box.run("import numpy as np\na = np.ones(8 * 2**30 // 8)")
    assert result.error.endswith("MemoryError: Unable to allocate 8.00 GiB for an array with shape "
                                 "(1073741824,) and data type float64")
    assert "MemoryError" in box.run("b = bytearray(8 * 2**30)").error
    assert not result.restarted and box.run("x").value == "5"  # state kept
    assert_unaffected(box, other)


@needs_sandbox
def test_file_size_is_limited(box, other):
    result = box.run("open('big.bin', 'wb').write(b'0' * (9 << 20))")
    assert "File too large" in result.error
    assert (box.workspace / "big.bin").stat().st_size <= 8 << 20
    assert_unaffected(box, other)


@pytest.mark.slow
@needs_sandbox
@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(100)"])
def test_wall_time_interrupts_and_keeps_state(box, other, code):
    box.run("x = 5")
    result = box.run(code, timeout=2)
    assert result.timed_out and not result.restarted
    assert result.error.endswith("KeyboardInterrupt: ")
    assert "the code ran past the 2 s time limit and was interrupted" in result.notes
    assert box.run("x").value == "5"
    assert_unaffected(box, other)


@pytest.mark.slow
@needs_sandbox
def test_code_that_ignores_the_interrupt_gets_a_fresh_kernel(box, other):
    box.run("x = 5")
    result = box.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass", timeout=2)
    assert result.timed_out and result.restarted
    assert result.notes[-1] == ("the interrupted code did not stop; the interpreter was restarted and its "
                                "variables are lost")
    assert "NameError" in box.run("x").error  # the restart lost the state, as it says
    assert_unaffected(box, other)


@needs_sandbox
def test_print_100_mb_is_truncated(box, other):
    box.run("x = 5")
    result = box.run("print('y' * 100_000_000)")
    assert result.truncated and not result.timed_out and not result.restarted
    assert result.stdout == "y" * LIMITS.max_output_chars
    assert "output truncated: only the first 2000 characters are kept" in result.notes
    assert box.run("x").value == "5"
    assert_unaffected(box, other)


@needs_sandbox
def test_fork_bomb_is_contained(box, other):
    result = box.run("import os\nwhile True:\n    os.fork()")
    assert "BlockingIOError: [Errno 11] Resource temporarily unavailable" in result.error
    assert result.restarted  # its processes are gone with the old kernel, and its state
    assert "processes running; the interpreter was restarted" in result.notes[-1]
    assert_unaffected(box, other)


@pytest.mark.slow
@needs_sandbox
def test_a_kernel_that_exits_is_restarted(box, other):
    result = box.run("import os\nos._exit(3)")
    assert result.restarted and result.notes == ["the interpreter exited; the interpreter was restarted and "
                                                 "its variables are lost"]
    assert_unaffected(box, other)


@needs_sandbox
def test_reset_gives_a_fresh_kernel_and_keeps_files(box, other):
    box.run("x = 5\nopen('reset.txt', 'w').write('kept')")
    box.reset()
    assert "NameError" in box.run("x").error
    assert box.run("open('reset.txt').read()").value == "'kept'"
    assert_unaffected(box, other)


@pytest.mark.slow
@needs_sandbox
def test_pool_keeps_one_kernel_per_conversation_and_closes_idle_ones(tmp_path):
    pool = SandboxPool(tmp_path, LIMITS, idle_timeout_s=3600)
    try:
        pool.run("a", "v = 'a'")
        pool.run("b", "v = 'b'")
        assert pool.run("a", "v").value == "'a'" and pool.run("b", "v").value == "'b'"
        assert pool.get("a") is pool.get("a") and pool.get("a").workspace == tmp_path / "a"
        pool.run("a", "open('kept.txt', 'w').write('a')")
        pool.idle_timeout_s = 0
        assert sorted(pool.close_idle()) == ["a", "b"]
        pool.idle_timeout_s = 3600
        assert "NameError" in pool.run("a", "v").error  # a fresh kernel, on the same workspace
        assert pool.run("a", "open('kept.txt').read()").value == "'a'"
        with pytest.raises(GlmkitError, match="conversation id '../x'"):
            pool.get("../x")
    finally:
        pool.close_all()
