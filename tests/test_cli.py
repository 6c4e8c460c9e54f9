"""The hawqc command: discovery of subcommands, lazy imports, errors, the demo."""

import subprocess
import sys
from pathlib import Path

import pytest

import hawqc
import hawqc.commands
from hawqc.cli import build_parser, main


def run_hawqc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hawqc.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_and_parser_import_neither_torch_nor_tvm() -> None:
    code = "import sys, hawqc.cli; hawqc.cli.build_parser(); print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tvm', 'numpy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hawqc {hawqc.__version__}"


def test_a_new_command_module_is_a_new_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "say_hello.py").write_text(
        "HELP = 'greet'\n"
        "def add_arguments(parser):\n    parser.add_argument('name')\n"
        "def run(args):\n    print('hello', args.name)\n    return 3\n"
    )
    monkeypatch.setattr(hawqc.commands, "__path__", [*hawqc.commands.__path__, str(tmp_path)])
    try:
        assert "say-hello" in build_parser().format_help()
        assert main(["say-hello", "you"]) == 3
        assert capsys.readouterr().out == "hello you\n"
    finally:
        sys.modules.pop("hawqc.commands.say_hello", None)


def test_demo_checks_arithmetic_and_shows_the_bit_plan() -> None:
    result = run_hawqc("demo", "--model", "tiny_resnet", "--cases", "500")
    assert result.returncode == 0, result.stderr
    assert "500 random cases" in result.stdout and "OK" in result.stdout
    assert "layer2.0.downsample.0" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--model", "vgg"], "hawqc demo: error: unknown model 'vgg'"),
        (["demo", "--bit-config", "nope.json"], "hawqc demo: error: nope.json is neither a bit-config file"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args: list[str], message: str) -> None:
    result = run_hawqc(*args)
    assert result.returncode == 1
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith(message)
    assert "Traceback" not in result.stderr
