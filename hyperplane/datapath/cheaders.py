"""Constants and map declarations read from the data path's C headers (bpf/*.h).

The C defines each enum, flag and map once; Python reads them from the same headers the
compiler sees (shipped inside the package as hyperplane.bpf), instead of keeping copies
that drift. Only the forms the headers use are understood: `enum name { A = expr, B, };`,
`#define NAME <integer expression>` and `HP_MAP(type, key, leaf, name, size, flags);`.
"""
from __future__ import annotations

import ast
import functools
import os
import re
from dataclasses import dataclass

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_INT_LITERAL = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b")


class HeaderError(Exception):
    pass


def strip_comments(text: str) -> str:
    return _COMMENT.sub(" ", text)


@functools.cache
def header_text(name: str) -> str:
    """A header of bpf/ without its comments."""
    from hyperplane.datapath.loader import bpf_dir
    with open(os.path.join(bpf_dir(), name)) as f:
        return strip_comments(f.read())


def evaluate(expr: str, names: dict[str, int]) -> int:
    """The value of a C integer constant expression (literals with U/L suffixes, names
    already known, + - * / % << >> | & ^ ~ and parentheses)."""
    py = _INT_LITERAL.sub(lambda m: str(int(m.group(1), 0)), expr.strip())
    if py.isdigit():  # the common case, without the cost of parsing Python
        return int(py)
    if py in names:
        return names[py]
    try:
        tree = ast.parse(py, mode="eval")
    except SyntaxError:
        raise HeaderError(f"not an integer expression: {expr!r}") from None
    ops = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__,
           ast.Div: int.__floordiv__, ast.FloorDiv: int.__floordiv__, ast.Mod: int.__mod__,
           ast.LShift: int.__lshift__, ast.RShift: int.__rshift__, ast.BitOr: int.__or__,
           ast.BitAnd: int.__and__, ast.BitXor: int.__xor__}

    def ev(node) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Invert, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else ~v if isinstance(node.op, ast.Invert) else v
        raise HeaderError(f"not an integer expression: {expr!r}")

    return ev(tree.body)


def defines(header: str, prefix: str = "") -> dict[str, int]:
    """NAME -> value of every `#define NAME <integer expression>` in a header (in order;
    macros with parameters, empty ones and non-integers are left out)."""
    return {k: v for k, v in _defines(header).items() if k.startswith(prefix)}


@functools.cache
def _defines(header: str) -> dict[str, int]:
    return parse_defines(header_text(header))


def parse_defines(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(.+)$", text, re.M):
        try:
            out[m.group(1)] = evaluate(m.group(2), out)
        except HeaderError:
            continue
    return out


def define(header: str, name: str) -> int:
    found = defines(header)
    if name not in found:
        raise HeaderError(f"bpf/{header} has no integer #define {name}")
    return found[name]


def enum_names(header: str) -> list[str]:
    """Names of the enums a header defines."""
    return re.findall(r"\benum\s+(\w+)\s*\{", header_text(header))


def enum(header: str, name: str) -> dict[str, int]:
    """Enumerator -> value of `enum name { ... }` (implicit values count on from the last),
    in declaration order."""
    return parse_enum(header_text(header), name, _defines(header))


def parse_enum(text: str, name: str, known: dict[str, int] | None = None) -> dict[str, int]:
    """known: the #defines an enumerator's value may use (default: those of text)."""
    m = re.search(rf"\benum\s+{re.escape(name)}\s*\{{(.*?)\}}", text, re.S)
    if not m:
        raise HeaderError(f"no enum {name}")
    known = parse_defines(text) if known is None else known
    out: dict[str, int] = {}
    value = -1
    for item in m.group(1).split(","):
        if not item.strip():
            continue
        em = re.fullmatch(r"\s*(\w+)\s*(?:=\s*(.+?))?\s*", item, re.S)
        if not em:
            raise HeaderError(f"cannot read enumerator {item.strip()!r} of enum {name}")
        value = evaluate(em.group(2), {**known, **out}) if em.group(2) else value + 1
        out[em.group(1)] = value
    return out


@dataclass(frozen=True)
class MapDecl:
    """One `HP_MAP(type, key, leaf, name, size, flags)` of bpf/maps.h."""
    type: str
    key: str
    leaf: str
    name: str
    size: str
    flags: str


def map_declarations(header: str = "maps.h") -> list[MapDecl]:
    """Every map declared with HP_MAP, in order (the macro's own #define is not one)."""
    return parse_map_declarations(header_text(header))


def parse_map_declarations(text: str) -> list[MapDecl]:
    text = re.sub(r"^[ \t]*#[^\n]*(?:\\\n[^\n]*)*", " ", text, flags=re.M)
    out = []
    for m in re.finditer(r"\bHP_MAP\s*\(([^;]*)\)\s*;", text):
        args = [a.strip() for a in m.group(1).split(",")]
        if len(args) != 6:
            raise HeaderError(f"HP_MAP with {len(args)} arguments, not 6: {m.group(0)!r}")
        out.append(MapDecl(args[0].strip('"'), *args[1:]))
    return out


def struct_members(header: str, name: str) -> list[tuple[str, str]]:
    """(type, member name) of `struct name { ... };` in a header, in order (an array
    member's name keeps its [N])."""
    m = re.search(rf"\bstruct\s+{re.escape(name)}\s*\{{(.*?)\}}\s*;", header_text(header), re.S)
    if not m:
        raise HeaderError(f"bpf/{header} has no struct {name}")
    out = []
    for decl in m.group(1).split(";"):
        dm = re.fullmatch(r"\s*(.+?)\s+(\w+\s*(?:\[[^\]]*\])?)\s*", decl, re.S)
        if dm:
            out.append((" ".join(dm.group(1).split()), dm.group(2).replace(" ", "")))
    return out
