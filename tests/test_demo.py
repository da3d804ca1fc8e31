"""The demo pipeline end to end (tiny configs), and the README's commands exist."""

import re
import shlex

import click
import pytest

from stemnet.cli import cli
from stemnet.demo import run_demo

from conftest import REPO


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path):
    report = run_demo(tmp_path / "demo", tiny=True, workers=2, progress=False)
    text = report.read_text()
    assert text.startswith("# stemnet demo report (tiny configuration)")
    for figure in ("figures/evaluate.png", "figures/samples.png", "reconstruction/haadf.png"):
        assert figure in text and (report.parent / figure).is_file(), figure
    rows = [line for line in text.splitlines() if line.startswith("model ") or line.startswith("zero ")]
    assert len(rows) == 2  # the metrics table holds the model and the baselines
    assert re.search(r"\| \*\*total\*\* \| \*\*\d+\.\d s\*\* \|", text)
    # a rerun reuses everything: no shard, checkpoint or exported weight is written again
    kept = sorted(p for p in (tmp_path / "demo").glob("data/*/shard-*.lmdb")) + sorted(
        p for pattern in ("run/checkpoints/*", "run/export/*", "run/config.yaml") for p in (tmp_path / "demo").glob(pattern))
    assert len(kept) > 5

    def state():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in kept}

    before = state()
    again = run_demo(tmp_path / "demo", tiny=True, workers=2, progress=False).read_text()
    assert again.startswith("# stemnet demo report (tiny configuration)")
    assert state() == before


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def make_targets():
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_exists(line):
    """Every command in the README's code blocks: a make target, or a stemnet command
    whose options parse (nothing is run)."""
    words = shlex.split(line.split("#")[0])
    if words[0] == "make":
        assert words[1] in make_targets(), line
        return
    assert ".venv/bin/stemnet" in words, line
    args = words[words.index(".venv/bin/stemnet") + 1:]
    command = cli
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
        assert name in command.commands, f"{line}: no sub-command {name!r}"
        command = command.commands[name]
    if args == ["--version"] or not args and isinstance(command, click.Group):
        return
    command.make_context(command.name, list(args))  # raises on unknown options or bad values
