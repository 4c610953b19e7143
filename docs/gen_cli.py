"""Write docs/cli.md, the flag reference, from edgeft's argparse parser (``train``'s flags are the config's fields).

python docs/gen_cli.py          # rewrite docs/cli.md
python docs/gen_cli.py --check  # exit 1 if docs/cli.md is stale (tests/test_docs.py does the same)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent / "cli.md"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        params = {**vars(action), "choices": ", ".join(map(str, action.choices or ()))}
        text = text % params
    return text


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return ", ".join(f"`{c}`" for c in action.choices)
    return action.metavar or action.dest.split(".")[-1].upper()


def _default(action: argparse.Action, fields: dict[str, Any]) -> str:
    if action.nargs == 0:
        return ""
    if "." in action.dest:  # a config field: its default lives in the config, not the parser
        default = fields.get(action.dest)
    else:
        default = action.default
    if default is None or default == []:
        return ""
    if isinstance(default, list):
        default = ",".join(map(str, default))
    return f"`{default}`"


def _config_defaults() -> dict[str, Any]:
    """Each config field's default by the parser ``dest`` (``section.field``) that sets it (the flags default to None:
    "not given")."""
    import dataclasses

    from edgeft.config import TrainConfig

    out: dict[str, Any] = {}
    for sec in TrainConfig.SECTIONS:
        for f in dataclasses.fields(sec):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f"{sec.NAME}.{f.name}"] = default
    return out


def _table(actions: list[argparse.Action], fields: dict[str, Any]) -> list[str]:
    rows = ["| flag | value | default | meaning |", "|---|---|---|---|"]
    for a in actions:
        if isinstance(a, argparse._HelpAction):  # noqa: SLF001
            continue
        flags = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}`"
        rows.append(f"| {flags} | {_cell(_value(a))} | {_cell(_default(a, fields))} | {_cell(_help(a))} |")
    return rows


def render() -> str:
    """The markdown of docs/cli.md."""
    from edgeft.cli import build_parser

    parser = build_parser()
    fields = _config_defaults()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    helps = {c.dest: c.help for c in sub._choices_actions}  # noqa: SLF001
    lines = [
        "# edgeft command line",
        "",
        "Generated from the parser by `python docs/gen_cli.py`; do not edit (tests/test_docs.py fails when this "
        "file is stale). The `train` flags are the config's fields ([config.md](config.md)): each is also a "
        "YAML key of `--config`, under its section.",
        "",
    ]
    lines += [f"- [`edgeft {name}`](#edgeft-{name}): {helps.get(name, '')}" for name in sub.choices]
    for name, p in sub.choices.items():
        lines += (
            ["", f"## edgeft {name}", "", helps.get(name) or "", ""]
            if lines[-1]
            else [f"## edgeft {name}", "", helps.get(name) or "", ""]
        )
        if p.description:
            lines += [p.description, ""]
        groups = [g for g in p._action_groups if g._group_actions]  # noqa: SLF001
        for g in groups:
            acts = [a for a in g._group_actions if not isinstance(a, argparse._HelpAction)]  # noqa: SLF001
            if not acts:
                continue
            if len(groups) > 1:
                lines += [f"### {g.title}", ""]
            lines += _table(acts, fields) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs from the parser")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
