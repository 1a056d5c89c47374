"""The README and the manual as written: every `glmkit` command line in their code blocks parses with
the command's own options (so a renamed or removed option fails here), and the README's Python example
runs as printed."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIXES = ("glmkit", ".venv/bin/glmkit")


def _blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def command_lines(path: Path) -> list[tuple[str, list[str]]]:
    """(line, args after `glmkit`) for each glmkit invocation in the file's code blocks."""
    out = []
    for block in _blocks(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                if not part.startswith(PREFIXES) or "..." in part or "…" in part:
                    continue
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                out.append((line, words[1:]))
    return out


CASES = [(p.name, line, args) for p in DOCS for line, args in command_lines(p)]


def test_the_docs_hold_commands():
    assert len(CASES) > 30 and any(name == "README.md" for name, _, _ in CASES)


# argparse's words for a command line that does not fit the options (a path that does not exist on
# this machine, e.g. a checkpoint the example assumes, is not such an error)
SHAPE_ERRORS = ("unrecognized arguments", "invalid choice", "expected one argument", "expected at least",
                "arguments are required", "not allowed with", "invalid int value", "invalid float value")


@pytest.mark.parametrize("name, line, args", CASES, ids=[f"{n}:{i}" for i, (n, _, _) in enumerate(CASES)])
def test_every_documented_command_parses(name, line, args, capsys):
    from glmkit.cli import COMMANDS, build_parser, verb_parser
    try:
        if not args or args[0].startswith("-"):
            build_parser().parse_args(args or [])
            return
        assert args[0] in COMMANDS, f"{name}: `{line}` names no verb of glmkit"
        verb, rest = args[0], args[1:]
        if rest and f"{verb} {rest[0]}" in COMMANDS:      # a sub-verb: `glmkit eval tools ...`
            verb, rest = f"{verb} {rest[0]}", rest[1:]
        verb_parser(verb).parse_args(rest)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 0 or not any(w in err for w in SHAPE_ERRORS), f"{name}: `{line}`: {err.strip()}"


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                            "OMP_NUM_THREADS": "2", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    printed = [ln for ln in lines if ln.startswith("50 ")]
    assert len(printed) == 1 and lines[-2].startswith("[") and lines[-1].startswith("[")   # step..., fills, text
    assert (tmp_path / "runs" / "quick" / "checkpoints").is_dir()
