"""Command-line arguments shared by every subcommand: `key=value` everywhere."""

from __future__ import annotations


def kv_to_flags(argv: list[str]) -> list[str]:
    """`key=value` arguments as argparse flags (`--key value`; `key=true` -> `--key`, `key=false` dropped), so
    commands with a fixed option list take the same `key=value` form as training. `--flags` pass through."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            out.append(arg)
            continue
        flag = "--" + key.replace("_", "-")
        if value.lower() in ("true", "yes"):
            out.append(flag)
        elif value.lower() not in ("false", "no"):
            out += [flag, value]
    return out
