"""Shell completions and man pages, generated from the CLI's command tree.

`haifctl completion SHELL` prints a script from here; scripts/gendocs.py writes them all to
completions/ and man/ (shipped in the wheel).  The scripts are static (commands, options and
choices) so that pressing TAB starts no Python, except where only haifctl knows the answer: the
registered model names (--model, `models show`...) and the daemons that have logs (`logs`), which
they ask `haifctl completion --names models|daemons` for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from haifctl import __version__

PROG = "haifctl"


@dataclass
class Opt:
    names: list[str]
    help: str
    takes_value: bool
    metavar: str
    choices: list[str]
    is_path: bool
    dynamic: str = ""  # what `haifctl completion --names` lists for its value ("" for none)


@dataclass
class Cmd:
    path: list[str]  # words after the program name
    help: str
    short: str
    usage: str
    options: list[Opt]
    arguments: list[tuple[str, str]]
    children: list[Cmd] = field(default_factory=list)
    dynamic: str = ""  # what `haifctl completion --names` lists for its arguments


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip() if text else ""


def _metavar(annotation: Any) -> str:
    names = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}
    inner = getattr(annotation, "__args__", None)
    return names.get(inner[0] if inner else annotation, "VALUE")


def _walk(command: Any, path: list[str], ctx: typer.Context) -> Cmd:
    # Typer ships its own copy of click, so params and commands are recognised by shape.
    options: list[Opt] = []
    arguments: list[tuple[str, str]] = []
    dynamic = ""
    for param in command.get_params(ctx):
        if param.param_type_name == "option":
            if param.hidden:
                continue
            annotation = param.type_descriptor.annotation
            choices = (
                [m.value for m in annotation]
                if isinstance(annotation, type) and issubclass(annotation, Enum)
                else []
            )
            options.append(
                Opt(
                    # long names first; click keeps help names in a set, so order them here
                    names=sorted(
                        [*param.opts, *param.secondary_opts], key=lambda n: not n.startswith("--")
                    ),
                    help=" ".join((param.help or "").split()),
                    takes_value=not param.is_flag and not param.count,
                    metavar="" if param.is_flag else (param.metavar or _metavar(annotation)),
                    choices=[str(c) for c in choices],
                    is_path=annotation is Path or param.name == "payload",
                    dynamic="models" if "--model" in param.opts else "",
                )
            )
        elif param.param_type_name == "argument":
            name = (param.metavar or param.name or "").upper()
            arguments.append((name if param.required else f"[{name}]", param.help or ""))
            dynamic = dynamic or DYNAMIC_ARGUMENTS.get(param.name or "", "")
    help_text = command.help or ""
    node = Cmd(
        path=path,
        help=help_text.strip(),
        short=command.short_help or _first_line(help_text),
        usage=" ".join(["[OPTIONS]", *(a for a, _ in arguments)])
        + (" COMMAND [ARGS]..." if hasattr(command, "list_commands") else ""),
        options=options,
        arguments=arguments,
        dynamic=dynamic,
    )
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = typer.Context(sub, info_name=name, parent=ctx)
            node.children.append(_walk(sub, [*path, name], sub_ctx))
    return node


# Arguments whose values only haifctl knows, by parameter name: a model reference (`models show
# REF`...), the daemons with logs (`logs DAEMONS`).
DYNAMIC_ARGUMENTS = {"ref": "models", "daemons": "daemons"}


def names_command(what: str) -> str:
    """The shell command a completion script runs for ``what``'s names (silent on failure)."""
    return f"{PROG} completion --names {what} 2>/dev/null"


def command_tree() -> Cmd:
    from haifctl.cli import command  # the CLI imports this module (`haifctl completion`)

    root = command()
    return _walk(root, [], typer.Context(root, info_name=PROG, **root.context_settings))


def _all(node: Cmd) -> list[Cmd]:
    out = [node]
    for child in node.children:
        out.extend(_all(child))
    return out


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# ---- bash -----------------------------------------------------------------------------------


def _value_actions(
    node: Cmd, choices: str, path: str, other: str, dynamic: str
) -> list[tuple[str, str]]:
    """(option names pattern, completion action) for this command's options that take a value."""
    out = []
    for opt in node.options:
        if not opt.takes_value:
            continue
        if opt.dynamic:
            action = dynamic.format(names_command(opt.dynamic))
        elif opt.choices:
            action = choices.format(" ".join(opt.choices))
        elif opt.is_path:
            action = path
        else:
            action = other.format(opt.metavar.lower() or "value")
        out.append(("|".join(opt.names), action))
    return out


def bash(tree: Cmd) -> str:
    nodes = _all(tree)
    transitions = sorted(f'"{" ".join(n.path[:-1])}:{n.path[-1]}"' for n in nodes if n.path)
    lines = [
        f"# bash completion for {PROG} (generated by scripts/gendocs.py; do not edit)",
        f"_{PROG}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local path="" word i opts="" cmds="" dynamic=""',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        word="${COMP_WORDS[i]}"',
        '        case "$path:$word" in',
        f'            {"|".join(transitions)}) path="${{path:+$path }}$word" ;;',
        "        esac",
        "    done",
        '    case "$path" in',
    ]
    for node in nodes:
        opts = " ".join(n for o in node.options for n in o.names)
        cmds = " ".join(c.path[-1] for c in node.children)
        lines.append(f'        "{" ".join(node.path)}")')
        lines.append(f"            opts={_sh_quote(opts)}; cmds={_sh_quote(cmds)}")
        if node.dynamic:
            lines.append(f"            dynamic={node.dynamic}")
        actions = _value_actions(
            node,
            "COMPREPLY=($(compgen -W '{}' -- \"$cur\"))",
            'COMPREPLY=($(compgen -f -- "$cur"))',
            "COMPREPLY=()",
            'COMPREPLY=($(compgen -W "$({})" -- "$cur"))',
        )
        if actions:
            lines.append('            case "$prev" in')
            for names, action in actions:
                lines.append(f"                {names}) {action}; return ;;")
            lines.append("            esac")
        lines.append("            ;;")
    lines += [
        "    esac",
        '    if [[ "$cur" == -* ]]; then',
        '        COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
        '    elif [[ -n "$cmds" ]]; then',
        '        COMPREPLY=($(compgen -W "$cmds" -- "$cur"))',
        '    elif [[ -n "$dynamic" ]]; then',
        f'        COMPREPLY=($(compgen -W "$({names_command("$dynamic")})" -- "$cur"))',
        "    else",
        '        COMPREPLY=($(compgen -f -- "$cur"))',
        "    fi",
        "}",
        f"complete -o filenames -F _{PROG} {PROG}",
        "",
    ]
    return "\n".join(lines)


# ---- zsh ------------------------------------------------------------------------------------


def _zsh_item(name: str, text: str) -> str:
    text = text.replace("\\", "\\\\").replace("'", "'\\''").replace(":", "\\:")
    name = name.replace(":", "\\:")
    return f"'{name}:{text}'"


def zsh(tree: Cmd) -> str:
    nodes = _all(tree)
    transitions = sorted(f'"{" ".join(n.path[:-1])}:{n.path[-1]}"' for n in nodes if n.path)
    lines = [
        f"#compdef {PROG}",
        f"# zsh completion for {PROG} (generated by scripts/gendocs.py; do not edit)",
        f"_{PROG}() {{",
        '    local path="" word i dynamic=""',
        "    local -a opts cmds",
        "    for ((i = 2; i < CURRENT; i++)); do",
        '        word="${words[i]}"',
        '        case "$path:$word" in',
        f'            ({"|".join(transitions)}) path="${{path:+$path }}$word" ;;',
        "        esac",
        "    done",
        '    case "$path" in',
    ]
    for node in nodes:
        opts = " ".join(_zsh_item(n, o.help) for o in node.options for n in o.names)
        cmds = " ".join(_zsh_item(c.path[-1], c.short) for c in node.children)
        lines.append(f'        ("{" ".join(node.path)}")')
        lines.append(f"            opts=({opts})")
        lines.append(f"            cmds=({cmds})")
        if node.dynamic:
            lines.append(f"            dynamic={node.dynamic}")
        actions = _value_actions(
            node, "compadd -- {}", "_files", "_message '{}'", 'compadd -- ${{(f)"$({})"}}'
        )
        if actions:
            lines.append('            case "${words[CURRENT-1]}" in')
            for names, action in actions:
                lines.append(f"                ({names}) {action}; return ;;")
            lines.append("            esac")
        lines.append("            ;;")
    lines += [
        "    esac",
        "    if [[ $PREFIX == -* ]]; then",
        "        _describe -t options option opts",
        "    elif (( ${#cmds} )); then",
        "        _describe -t commands command cmds",
        "    elif [[ -n $dynamic ]]; then",
        f'        compadd -- ${{(f)"$({names_command("$dynamic")})"}}',
        "    else",
        "        _files",
        "    fi",
        "}",
        f'if [[ $zsh_eval_context[-1] == loadautofunc ]]; then _{PROG} "$@"; '
        f"else compdef _{PROG} {PROG}; fi",
        "",
    ]
    return "\n".join(lines)


# ---- fish -----------------------------------------------------------------------------------


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish(tree: Cmd) -> str:
    lines = [
        f"# fish completion for {PROG} (generated by scripts/gendocs.py; do not edit)",
        f"complete -c {PROG} -f",
    ]
    for node in _all(tree):
        if node.path:
            cond = "; and ".join(f"__fish_seen_subcommand_from {w}" for w in node.path)
        else:
            cond = "__fish_use_subcommand"
        if node.children:
            names = " ".join(c.path[-1] for c in node.children)
            not_yet = f"; and not __fish_seen_subcommand_from {names}"
            for child in node.children:
                lines.append(
                    f"complete -c {PROG} -n {_fish_quote(cond + not_yet)} -a {child.path[-1]} "
                    f"-d {_fish_quote(child.short)}"
                )
        elif not node.options and not node.arguments:
            continue
        for opt in node.options:
            flags = []
            for name in opt.names:
                flags.append(f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}")
            extra = ""
            if opt.takes_value:
                if opt.dynamic:
                    extra = f" -x -a {_fish_quote('(' + names_command(opt.dynamic) + ')')}"
                elif opt.choices:
                    extra = f" -x -a {_fish_quote(' '.join(opt.choices))}"
                elif opt.is_path:
                    extra = " -r -F"
                else:
                    extra = " -x"
            lines.append(
                f"complete -c {PROG} -n {_fish_quote(cond)} {' '.join(flags)}{extra} "
                f"-d {_fish_quote(opt.help)}"
            )
        if node.dynamic:
            names_of = _fish_quote("(" + names_command(node.dynamic) + ")")
            lines.append(f"complete -c {PROG} -n {_fish_quote(cond)} -a {names_of}")
        elif not node.children and any("PATH" in a[0] or "PROMPT" in a[0] for a in node.arguments):
            lines.append(f"complete -c {PROG} -n {_fish_quote(cond)} -F")
    return "\n".join(lines) + "\n"


# ---- man ------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    out = []
    for line in text.split("\n"):
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _blocks(text: str) -> list[tuple[str, bool]]:
    """Paragraphs, reflowed, and the blocks that keep their lines (click's ``\\b`` marker)."""
    out = []
    for p in text.strip().split("\n\n"):
        if p.startswith("\b"):
            out.append(("\n".join(line.strip() for line in p.split("\n")[1:]), True))
        elif p.strip():
            out.append((" ".join(p.split()), False))
    return out


def _options_section(options: list[Opt]) -> list[str]:
    lines: list[str] = []
    for opt in options:
        names = ", ".join(f"\\fB{_roff(n)}\\fR" for n in opt.names)
        value = f" \\fI{_roff(opt.metavar)}\\fR" if opt.takes_value and opt.metavar else ""
        lines += [".TP", names + value, _roff(opt.help or "")]
    return lines


def _header(name: str, summary: str) -> list[str]:
    return [
        f'.TH "{name.upper()}" "1" "" "haifctl {__version__}" "haifctl manual"',
        '.\\" generated by scripts/gendocs.py from the Typer app; do not edit',
        ".SH NAME",
        f"{_roff(name)} \\- {_roff(summary)}",
    ]


def _describe(node: Cmd, lines: list[str]) -> None:
    for i, (para, verbatim) in enumerate(_blocks(node.help)):
        if i:
            lines.append(".PP")
        lines += [".nf", _roff(para), ".fi"] if verbatim else [_roff(para)]


def man_root(tree: Cmd) -> str:
    lines = _header(PROG, tree.short)
    lines += [".SH SYNOPSIS", f".B {PROG}", "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]..."]
    lines += [".SH DESCRIPTION"]
    _describe(tree, lines)
    lines += [".SH OPTIONS", *_options_section(tree.options), ".SH COMMANDS"]
    for child in tree.children:
        lines += [".TP", f"\\fB{_roff(child.path[-1])}\\fR", _roff(child.short)]
        lines.append(f"See \\fB{PROG}\\-{_roff(child.path[-1])}\\fR(1).")
    lines += [
        ".SH ENVIRONMENT",
        "Settings resolve as: command-line flag, then environment, then the config file, then "
        "the default. \\fBhaifctl config show\\fR prints each value and its source.",
        ".TP",
        "\\fBHAIF_HOME\\fR",
        "The haifctl home: config.toml, registry.db and daemon state.",
        ".TP",
        "\\fBHAIF_REGISTRY_URL\\fR",
        "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB; POSTGRES_USER, "
        "POSTGRES_PASSWORD and POSTGRES_DB build a Postgres URL too.",
        ".TP",
        "\\fBHAIF_MODEL\\fR, \\fBMODEL_ID\\fR",
        "The default model.",
        ".SH FILES",
        ".TP",
        "\\fI$HAIF_HOME/config.toml\\fR",
        "Settings in TOML, one key per setting (see \\fBhaifctl config show\\fR).",
        ".TP",
        "\\fI$HAIF_HOME/registry.db\\fR",
        "The default SQLite model registry.",
        ".SH SEE ALSO",
        ", ".join(f"\\fB{PROG}\\-{_roff(c.path[-1])}\\fR(1)" for c in tree.children),
        "",
    ]
    return "\n".join(lines)


def man_group(node: Cmd) -> str:
    name = f"{PROG}-{node.path[-1]}"
    lines = _header(name, node.short)
    lines += [".SH SYNOPSIS", f".B {PROG} {_roff(' '.join(node.path))}", _roff(node.usage)]
    lines += [".SH DESCRIPTION"]
    _describe(node, lines)
    if node.options:
        lines += [".SH OPTIONS", *_options_section(node.options)]
    if node.children:
        lines.append(".SH COMMANDS")
        for child in node.children:
            lines += [
                f'.SS "{PROG} {_roff(" ".join(child.path))} {_roff(child.usage)}"',
            ]
            _describe(child, lines)
            if child.options:
                lines += [".RS", *_options_section(child.options), ".RE"]
    lines += [".SH SEE ALSO", f"\\fB{PROG}\\fR(1)", ""]
    return "\n".join(lines)


def render() -> dict[Path, str]:
    tree = command_tree()
    files = {
        Path("completions") / f"{PROG}.bash": bash(tree),
        Path("completions") / f"_{PROG}": zsh(tree),
        Path("completions") / f"{PROG}.fish": fish(tree),
        Path("man") / f"{PROG}.1": man_root(tree),
    }
    for child in tree.children:
        files[Path("man") / f"{PROG}-{child.path[-1]}.1"] = man_group(child)
    return files
