"""The documentation matches the code: doc/flags.md is what tools/flags_doc.py writes now, every command line
in the README that runs one of our scripts parses with that script's own parser, and the README stays short."""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_MAX_LINES = 200
LAUNCHERS = ("python", "python3", "torchrun")
SHELL_OPERATORS = ("|", "||", "&&", ";", "&", ">", ">>", "2>", "<")
# The earlier unofficial reimplementation's published command lines: they stay in the README word for word.
PUBLISHED = [
    "python run_training.py --model_dir models --head_layer 2",
    "python run_training.py --model_dir models --head_layer 2 --cuda 1",
    "tensorboard --logdir logdirs",
    "python eval.py --model_dir models --head_layer 2",
    "python eval.py --density torch --cuda 1 --head_layer 2 --save_plots 0 | grep AUC",
    "python eval.py --density sklearn --cuda 1 --head_layer 2 --save_plots 0 | grep AUC",
    *(f"python run_training.py --epochs 10000 --test_epochs {t} --no-pretrained --cuda 1 --head_layer 1 "
      f"--batch_size 32 --variant {v}" for t, v in (("32", "normal"), ("32", "scar"), ("-1", "3way"))),
]

_spec = importlib.util.spec_from_file_location("tools.flags_doc", ROOT / "tools" / "flags_doc.py")
flags_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flags_doc)


def readme_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """(line, script, arguments) for each code-block line that runs a .py script with python or torchrun.

    Lines continued with a backslash are joined; leading VAR=value assignments are dropped; the command ends
    at the first shell operator (a pipe into grep, a redirection); torchrun's own flags (placeholders such as
    HOST included) are whatever precedes the script.
    """
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                words = words[1:]
            if not words or words[0] not in LAUNCHERS:
                continue
            cut = [i for i, w in enumerate(words) if w in SHELL_OPERATORS]
            words = words[:cut[0]] if cut else words
            at = [i for i, w in enumerate(words[1:], 1) if w.endswith(".py")][:1]
            if at and (words[0] == "torchrun" or at[0] == 1):  # `python -m pytest tests/x.py` runs no script of ours
                found.append((" ".join(line.split()), words[at[0]], words[at[0] + 1:]))
    return found


COMMANDS = readme_commands(README)


def test_flags_doc_is_current():
    assert (ROOT / "doc" / "flags.md").read_text(encoding="utf-8") == flags_doc.render(), \
        "doc/flags.md is stale: run python tools/flags_doc.py"


def test_readme_keeps_the_published_command_lines():
    lines = {re.sub(r"\s+#.*$", "", line).strip() for line in README.splitlines()}  # a trailing comment may follow
    assert [c for c in PUBLISHED if c not in lines] == []


def test_readme_is_short():
    assert len(README.splitlines()) <= README_MAX_LINES


def test_readme_commands_found():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"run_training.py", "eval.py", "predict.py", "demo.py", "dataset.py", "reproduce.py"} <= scripts


@pytest.mark.parametrize("line,script,args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_readme_command_parses(line, script, args, capsys):
    assert script in flags_doc.SCRIPTS, f"the README runs {script}, not a script of tools/flags_doc.SCRIPTS: {line}"
    parser = flags_doc.load_script(script).get_args_parser()
    try:
        parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"README line does not parse with {script}'s flags:\n  {line}\n{capsys.readouterr().err}")
