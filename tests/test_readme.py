"""README.md as printed: every command and example in it runs and does what the text says.

Commands run through bash with the venv's bin/ first on PATH (what `. .venv/bin/activate`,
which README asks for once, does), from a scratch directory. README's first command (set-up
and `validate quick`, minutes long) is run by .ci/run through scripts/readme_first_command.sh;
the second (`bash scripts/test.sh`) is what runs this file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
from server_process import ServerProcess, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The text of README's `## title` section, up to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def commands(block: str) -> list[str]:
    """Shell commands of a block: a line at column 0 starts one, indented lines continue it;
    comment lines and trailing `  # ...` comments are not part of a command."""
    out: list[str] = []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        line = re.sub(r"\s{2,}#.*$", "", line)
        if line[0].isspace() and out:
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def venv_env() -> dict[str, str]:
    """The environment an activated venv gives: its bin/ first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"PATH": f"{bin_dir}:{env['PATH']}", "VIRTUAL_ENV": str(Path(bin_dir).parent)}


def run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=venv_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-4000:])
    return done


def test_first_hour_commands_are_what_ci_runs() -> None:
    first_block = code_blocks(README.split("\n## ")[0], "bash")[0]
    setup_and_validate, tests = commands(first_block)
    assert setup_and_validate.startswith("bash scripts/setup.sh && .venv/bin/sageserve validate")
    assert tests == "bash scripts/test.sh"
    ci = (ROOT / ".ci/run").read_text()
    assert "bash scripts/test.sh" in ci and "bash scripts/readme_first_command.sh" in ci
    assert "activate" in README.split("\n## ")[0]  # how the venv is used, said at the top


def test_talk_to_the_model(tmp_path: Path) -> None:
    command, printed = re.search(
        r"talk to the model: `([^`]+)`\s+prints\s+`([^`]+)`", README
    ).groups()
    assert run(command, tmp_path).stdout.strip() == printed


def test_command_line_block(tmp_path: Path) -> None:
    block = code_blocks(section("Command line"), "bash")[0]
    for command in commands(block):
        done = run(command, tmp_path)
        assert done.stdout.strip(), command
        if "--json" in command:
            assert "Paris" in json.loads(done.stdout)["text"]
    assert (tmp_path / "smollm2-hf" / "config.json").is_file()


def test_offline_api_snippet(tmp_path: Path) -> None:
    (snippet,) = code_blocks(section("Offline API"), "python")
    probe = "\nassert 'Paris' in out.text and len(out.logprobs) == len(out.token_ids)\n"
    run(f"python - <<'EOF'\n{snippet}{probe}EOF", tmp_path)


def test_server_and_curl_examples(tmp_path: Path) -> None:
    """The server command as printed (port 30000) and each curl line as printed, JSON body
    sent with curl's default Content-Type."""
    launch, *curls = commands(code_blocks(section("HTTP server"), "bash")[0])
    assert launch.startswith("python -m sageserve.launch_server") and len(curls) == 2
    port = int(re.search(r"--port (\d+)", launch).group(1))
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {launch}"], cwd=tmp_path, env=venv_env(), stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_healthy(ServerProcess(f"http://127.0.0.1:{port}", process, log))
        generated = json.loads(run(curls[0], tmp_path).stdout)
        assert "Paris" in generated["text"], generated
        assert len(generated["meta_info"]["output_top_logprobs"]) == 16
        chat = json.loads(run(curls[1], tmp_path).stdout)
        assert "Paris" in chat["choices"][0]["message"]["content"], chat
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
    startup = log.read_text()
    for phase in ("load:", "calibrate:", "allocate:"):
        assert re.search(rf"{phase} done in \d+\.\d s", startup), startup


def test_relative_links_resolve() -> None:
    links = [x for x in re.findall(r"\]\(([^)#]+)\)", README) if not x.startswith("http")]
    assert links and all((ROOT / link).exists() for link in links), links
