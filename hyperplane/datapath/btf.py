"""BPF Type Format (BTF) of a loaded program, parsed in Python, turned into ctypes types.

bcc loads the program's BTF (the C structs as clang saw them) into the kernel and ties
each map to its key and value type ids. Reading it back gives the exact layout of a map's
entries from the C itself, so a process that opens the pinned maps without compiling
(hyperplane/datapath/pinned.py) still defines nothing about the structs in Python.

Format: linux/btf.h (Documentation/bpf/btf.rst). Only what map keys and values use is
turned into ctypes: ints, enums, arrays, structs and unions (with padding), typedefs and
qualifiers; a map whose key or value has bit-fields or pointers is refused with a clear
error (other types in the blob, e.g. kernel headers' structs, are only parsed).
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

BTF_MAGIC = 0xEB9F

# BTF_KIND_* (linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, \
    FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(1, 20)
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
BTF_INT_SIGNED = 1


@dataclass
class BtfType:
    kind: int
    name: str
    size_or_type: int            # size for INT/STRUCT/UNION/ENUM*, type id for the others
    kind_flag: bool = False
    int_bits: int = 0            # INT: nr_bits
    int_offset: int = 0          # INT: bit offset (only in bit-field encodings)
    int_signed: bool = False
    array: tuple[int, int] = (0, 0)                   # ARRAY: (element type id, nelems)
    # STRUCT/UNION members: (name, type id, bit offset, bit-field size or 0)
    members: list[tuple[str, int, int, int]] = field(default_factory=list)
    enumerators: dict[str, int] = field(default_factory=dict)


class BtfError(Exception):
    pass


def parse(raw: bytes) -> dict[int, BtfType]:
    """Type id -> type of a raw BTF blob (the kernel's copy, as bpf_btf_get_info gives it)."""
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("<HBBIIIII", raw, 0)
    if magic != BTF_MAGIC:
        raise BtfError(f"not BTF (magic {magic:#x})")
    types_ = raw[hdr_len + type_off: hdr_len + type_off + type_len]
    strings = raw[hdr_len + str_off: hdr_len + str_off + str_len]

    def name(off: int) -> str:
        return strings[off: strings.index(b"\0", off)].decode()

    out: dict[int, BtfType] = {}
    pos, tid = 0, 1  # type id 0 is void
    while pos < len(types_):
        name_off, info, size_or_type = struct.unpack_from("<III", types_, pos)
        pos += 12
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
        t = BtfType(kind, name(name_off), size_or_type, kflag)
        if kind == INT:
            (enc,) = struct.unpack_from("<I", types_, pos)
            pos += 4
            t.int_bits, t.int_offset = enc & 0xFF, (enc >> 16) & 0xFF
            t.int_signed = bool((enc >> 24) & BTF_INT_SIGNED)
        elif kind == ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", types_, pos)
            pos += 12
            t.array = (elem, nelems)
        elif kind in (STRUCT, UNION):
            for _ in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", types_, pos)
                pos += 12
                bits, off = (m_off >> 24, m_off & 0xFFFFFF) if kflag else (0, m_off)
                t.members.append((name(m_name), m_type, off, bits))
        elif kind == ENUM:
            for _ in range(vlen):
                e_name, e_val = struct.unpack_from("<Ii" if kflag else "<II", types_, pos)
                pos += 8
                t.enumerators[name(e_name)] = e_val
        elif kind == ENUM64:
            for _ in range(vlen):
                e_name, lo, hi = struct.unpack_from("<III", types_, pos)
                pos += 12
                t.enumerators[name(e_name)] = lo | hi << 32
        elif kind == FUNC_PROTO:
            pos += 8 * vlen
        elif kind == VAR or kind == DECL_TAG:
            pos += 4
        elif kind == DATASEC:
            pos += 12 * vlen
        elif kind not in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
            raise BtfError(f"unknown BTF kind {kind}")
        out[tid] = t
        tid += 1
    return out


_INTS = {(1, False): ctypes.c_uint8, (2, False): ctypes.c_uint16, (4, False): ctypes.c_uint32,
         (8, False): ctypes.c_uint64, (1, True): ctypes.c_int8, (2, True): ctypes.c_int16,
         (4, True): ctypes.c_int32, (8, True): ctypes.c_int64}


class Types:
    """ctypes types built from one program's BTF, cached by type id."""

    def __init__(self, types_: dict[int, BtfType]):
        self.types = types_
        self._built: dict[int, type] = {}

    def resolve(self, tid: int) -> BtfType:
        """The type behind typedefs and qualifiers."""
        t = self.types[tid]
        while t.kind in _QUALIFIERS:
            t = self.types[t.size_or_type]
        return t

    def by_name(self, kind: int, name: str) -> int:
        for tid, t in self.types.items():
            if t.kind == kind and t.name == name:
                return tid
        raise BtfError(f"no {name!r} (BTF kind {kind}) in the program's BTF")

    def ctype(self, tid: int) -> type:
        if tid not in self._built:
            self._built[tid] = self._build(tid)
        return self._built[tid]

    def _build(self, tid: int) -> type:
        t = self.types[tid]
        if t.kind in _QUALIFIERS:
            return self.ctype(t.size_or_type)
        if t.kind == INT:
            if t.int_bits != 8 * t.size_or_type or t.int_offset or \
                    (t.size_or_type, t.int_signed) not in _INTS:
                raise BtfError(f"int {t.name!r} of {t.int_bits} bits is not supported")
            return _INTS[(t.size_or_type, t.int_signed)]
        if t.kind in (ENUM, ENUM64):
            signed = t.kind_flag or any(v < 0 for v in t.enumerators.values())
            return _INTS[(t.size_or_type, signed)]
        if t.kind == ARRAY:
            elem, n = t.array
            return self.ctype(elem) * n
        if t.kind in (STRUCT, UNION):
            return self._record(tid, t)
        raise BtfError(f"BTF kind {t.kind} ({t.name!r}) cannot be a map key or value here")

    def _record(self, tid: int, t: BtfType) -> type:
        """A ctypes Structure/Union with the C's member offsets and size: explicit padding
        members where the C has holes, _pack_ = 1 so ctypes adds none of its own."""
        fields, anonymous, at = [], [], 0
        for i, (name, mtid, bit_off, bits) in enumerate(t.members):
            if bits or bit_off % 8:
                raise BtfError(f"bit-field {name!r} of {t.name!r} is not supported")
            off, ctype = bit_off // 8, self.ctype(mtid)
            if t.kind == STRUCT and off < at:
                raise BtfError(f"member {name!r} of {t.name!r} overlaps the one before")
            if t.kind == STRUCT and off > at:
                fields.append((f"_hole{len(fields)}", ctypes.c_uint8 * (off - at)))
            if not name:  # an anonymous struct/union member: its fields are reachable
                name = f"_anon{i}"
                anonymous.append(name)
            fields.append((name, ctype))
            if t.kind == STRUCT:
                at = max(at, off + ctypes.sizeof(ctype))
            if t.kind == UNION:
                at = max(at, ctypes.sizeof(ctype))
        size = t.size_or_type
        if size > at:  # tail padding (a union: the whole size)
            fields.append(("_tail", ctypes.c_uint8 * (size - at if t.kind == STRUCT else size)))
        base = ctypes.Structure if t.kind == STRUCT else ctypes.Union
        cls = type(t.name or f"anon_{tid}", (base,),
                   {"_pack_": 1, "_anonymous_": anonymous, "_fields_": fields})
        if ctypes.sizeof(cls) != size:
            raise BtfError(f"{t.name!r}: built {ctypes.sizeof(cls)} bytes, BTF says {size}")
        return cls
