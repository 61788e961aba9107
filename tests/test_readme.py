"""The README's command lines against the parsers that run them, so that documentation drift fails.

Every `flux2-klein ...` line in a README code block must use only options its subcommand has (with
values among their choices, and required ones outside brackets); the "Command line" block must name every
option of every subcommand and every choice; the container's variable table must match the
entrypoint's own list (which its --help prints). No server is started.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from flux2_klein.cli import build_parser
from flux2_klein.client.gateway.settings import DEFAULTS as GATEWAY_DEFAULTS
from flux2_klein.client.gateway.settings import ENV as GATEWAY_ENV
from flux2_klein.configs import CONFIG_DIR, NAMED_CONFIGS, config_path
from flux2_klein.container.settings import ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def _blocks(text: str) -> list[str]:
    """The bodies of the shell code blocks (```bash, ```sh or a bare ```), fences paired in order."""
    blocks, body, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body, lang = [], line[3:].strip()
            else:
                if lang in ("", "bash", "sh"):
                    blocks.append("\n".join(body) + "\n")
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def _command_lines(block: str) -> list[str]:
    """`flux2-klein` invocations in a block, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        line = re.sub(r"\s#\s.*$", "", current).strip()
        current = ""
        m = re.match(r"^(?:\S*/)?flux2-klein\s+(.*?)\s*&?$", line)
        if m:
            lines.append(m.group(1))
    return lines


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """'tiny', 'export onnx', ... -> the parser of that (leaf) subcommand."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subparsers(sub)
                out.update({f"{name} {k}": v for k, v in nested.items()} if nested else {name: sub})
    return out


PARSER = build_parser()
SUBCOMMANDS = _subparsers(PARSER)
GLOBAL = {s for a in PARSER._actions for s in a.option_strings}


def _options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _parse_line(line: str) -> tuple[str, list[tuple[str, list[str], bool]]]:
    """(subcommand, [(flag, documented values, bracketed)]) of one synopsis line."""
    words = line.split()
    for n in (2, 1):
        if " ".join(words[:n]) in SUBCOMMANDS:
            name = " ".join(words[:n])
            break
    else:
        raise AssertionError(f"README: `flux2-klein {line}`: no such subcommand (have {', '.join(SUBCOMMANDS)})")
    flags = []
    for m in FLAG.finditer(line):
        depth = line[:m.start()].count("[") - line[:m.start()].count("]")
        rest = line[m.end():].lstrip(" =")
        value = re.match(r"[^\s\]\[]+", rest)
        values = value.group(0).split("|") if value and "|" in value.group(0) else \
            [value.group(0)] if value and not value.group(0).startswith(("-", "...")) else []
        flags.append((m.group(0), values, depth > 0))
    return name, flags


def _is_general(line: str) -> bool:
    """The `flux2-klein [-v] COMMAND ...` line: the options before any subcommand."""
    return "COMMAND" in line.split()


CONTRACT = (ROOT / "docs" / "CONTRACT.md").read_text()
# CONTRACT.md's command table: `flux2-klein ...` in backticks, `\|` for a choice's bar.
CONTRACT_LINES = [m.replace("\\|", "|") for m in re.findall(r"`flux2-klein ([^`]+)`", CONTRACT)]
ALL_LINES = [line for block in _blocks(README) for line in _command_lines(block)] + CONTRACT_LINES
SYNOPSIS = [line for block in _blocks(_section("Command line")) for line in _command_lines(block)]


def test_the_general_line_shows_the_global_options():
    general = [line for line in SYNOPSIS if _is_general(line)]
    assert general, "README's Command line block lacks `flux2-klein [-v] COMMAND ...`"
    shown = set(re.findall(r"\[(-{1,2}[a-z][a-z-]*)\]", general[0]))
    assert shown and shown <= GLOBAL, f"README shows global options {sorted(shown)}; the parser has {sorted(GLOBAL)}"
    assert {s for s in GLOBAL if s not in ("-h", "--help")} & shown, "a global option is not shown"


def test_the_readme_has_command_lines_to_check():
    assert len(ALL_LINES) >= 15 and len(SYNOPSIS) >= 10 and len(CONTRACT_LINES) >= 4


@pytest.mark.parametrize("line", [line for line in ALL_LINES if not _is_general(line)])
def test_each_readme_command_line_parses_against_its_subcommand(line):
    name, flags = _parse_line(line)
    options = _options(SUBCOMMANDS[name])
    for flag, values, _ in flags:
        if flag in GLOBAL:
            continue
        assert flag in options, f"README: `flux2-klein {line}`: {name} has no {flag} (has {', '.join(options)})"
        choices = options[flag].choices
        if choices and values and not any(v.isupper() or v.startswith(("<", "$")) for v in values):
            unknown = set(values) - {str(c) for c in choices}
            assert not unknown, f"README: `{name} {flag}` shows {sorted(unknown)}; allowed: {list(choices)}"


def test_the_synopsis_names_every_option_and_choice_of_every_subcommand():
    documented: dict[str, dict[str, set[str]]] = {}
    for line in SYNOPSIS:
        if _is_general(line):
            continue
        name, flags = _parse_line(line)
        for flag, values, bracketed in flags:
            documented.setdefault(name, {}).setdefault(flag, set()).update(values)
            action = _options(SUBCOMMANDS[name]).get(flag)
            if action is not None and action.required:
                assert not bracketed, f"README: {name} {flag} is required but shown as optional [...]"
    problems = []
    for name, sub in SUBCOMMANDS.items():
        if name not in documented:
            problems.append(f"{name}: no synopsis line")
            continue
        for flag, action in _options(sub).items():
            if flag not in documented[name]:
                problems.append(f"{name} {flag}: in --help, not in the README")
            elif action.choices and documented[name][flag] and not action.nargs == "?":
                missing = {str(c) for c in action.choices} - documented[name][flag]
                if missing:
                    problems.append(f"{name} {flag}: choices {sorted(missing)} not shown")
    assert not problems, "README's Command line block and --help differ:\n" + "\n".join(problems)


def test_serve_help_states_each_port_and_its_default():
    text = SUBCOMMANDS["serve"].format_help()
    for flag, default in (("--http-port", 8000), ("--grpc-port", 8001), ("--metrics-port", 8002)):
        help_line = text[text.index(flag):].split("\n--")[0]
        assert f"default {default}" in " ".join(help_line.split()), flag


def _env_table() -> dict[str, str]:
    rows = re.findall(r"^\| (FLUX2_KLEIN_\w+) \| ([^|]*) \|", README, flags=re.M)
    assert rows, "README has no table of FLUX2_KLEIN_* variables"
    return {name: default.strip() for name, default in rows}


def test_the_container_variable_table_matches_the_entrypoint():
    table = _env_table()
    entrypoint = {name: (default or "(empty)") for name, default, _ in ENV_VARS}
    gateway = {GATEWAY_ENV[k]: str(GATEWAY_DEFAULTS.get(k, "")) for k in GATEWAY_ENV}
    for name, default in entrypoint.items():
        assert name in table, f"README's variable table lacks {name} (the entrypoint's --help has it)"
        assert table[name] == default, f"README: {name} defaults to {table[name]!r}; the entrypoint says {default!r}"
    for name, default in table.items():
        assert name in entrypoint or name in gateway, f"README documents {name}, which nothing reads"
        if name not in entrypoint and gateway[name]:
            assert default == gateway[name], f"README: {name} defaults to {default!r}; the gateway says {gateway[name]!r}"


def test_the_real_model_config_ships_in_the_package():
    path = config_path("4b")
    assert path.parent == CONFIG_DIR and path.is_file() and set(NAMED_CONFIGS) == {"4b"}
    with pytest.raises(FileNotFoundError, match="config: 'nope' is neither a shipped config"):
        config_path("nope")
    assert "shared/configs" not in README, "README still points at shared/configs, which is not in the repository"
