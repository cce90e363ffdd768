"""YAML text for Kubernetes manifests, without a YAML library.

Manifests are dicts, lists, strings, ints and bools only, so a small writer
suffices and distbatch needs no PyYAML at run time. A string is written plain
only when every YAML 1.1 and 1.2 reader reads it back as that same string
(no number, bool, null, date or indicator look-alikes); a multi-line string
(a pod's shell script) as a literal block, so it reads as the script; anything
else double-quoted with JSON's escapes, which YAML's double-quoted style shares.
"""
from __future__ import annotations

import json
import re

# A letter, '_', '/' or a flag's dashes first (no number, date, indicator or ".inf" starts
# so), then the characters of names, paths, image references and flags; ':' only inside
# (no spaces at all, so never ": "); no '#'.
_PLAIN = re.compile(r"(?:[A-Za-z_/]|--?[A-Za-z])(?:[A-Za-z0-9_./=+:@-]*[A-Za-z0-9_./=+@-])?\Z")
# Words YAML 1.1 readers (PyYAML, many tools) turn into bools or null.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value)
    raise TypeError(f"a manifest holds dicts, lists, str, int and bool only, got {type(value).__name__}")


def _literal_block(value: str) -> bool:
    """A multi-line string that a literal block (`|` or `|-`) keeps exactly."""
    return ("\n" in value and not value[:1].isspace() and not value.endswith("\n\n")
            and all(c == "\n" or (c.isprintable() and c != "\t") for c in value))


def _lines(value, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        out = []
        for key, item in value.items():
            head = f"{pad}{_scalar(str(key))}:"
            if isinstance(item, (dict, list)) and item:
                out.append(head)
                # Lists sit at their key's indentation (kubectl's style), maps one level in.
                out += _lines(item, indent if isinstance(item, list) else indent + 2)
            elif isinstance(item, str) and _literal_block(item):
                out.append(head + (" |" if item.endswith("\n") else " |-"))
                out += [(pad + "  " + line) if line else "" for line in item.rstrip("\n").split("\n")]
            else:
                out.append(f"{head} {_inline(item)}")
        return out
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        out = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                inner = _lines(item, indent + 2)
                out.append(pad + "- " + inner[0][indent + 2:])
                out += inner[1:]
            elif isinstance(item, str) and _literal_block(item):
                out.append(pad + "- " + ("|" if item.endswith("\n") else "|-"))
                out += [(pad + "  " + line) if line else "" for line in item.rstrip("\n").split("\n")]
            else:
                out.append(f"{pad}- {_inline(item)}")
        return out
    return [pad + _inline(value)]


def _inline(value) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(manifest: dict) -> str:
    """One YAML document (starting with ``---``) for `manifest`."""
    return "---\n" + "\n".join(_lines(manifest, 0)) + "\n"
