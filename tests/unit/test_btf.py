"""BTF -> ctypes: the layout built from a BTF blob is the one a C compiler gives the struct.

The blob is written here by hand in the kernel's format (linux/btf.h); the expected layout
is ctypes' own natural alignment of the same C struct, which is the C ABI's on x86-64."""
import ctypes
import struct

import pytest

from hyperplane.datapath import btf


class BlobWriter:
    """A minimal BTF encoder: add types in order (ids from 1), then bytes()."""

    def __init__(self):
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.next_id = 1

    def _str(self, s: str) -> int:
        if not s:
            return 0
        off = len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def _type(self, name, kind, vlen, size_or_type, extra=b"", kflag=False) -> int:
        info = (kind << 24) | vlen | (int(kflag) << 31)
        self.types += struct.pack("<III", self._str(name), info, size_or_type) + extra
        self.next_id += 1
        return self.next_id - 1

    def int(self, name, size, signed=False):
        enc = (1 if signed else 0) << 24 | size * 8
        return self._type(name, btf.INT, 0, size, struct.pack("<I", enc))

    def typedef(self, name, tid):
        return self._type(name, btf.TYPEDEF, 0, tid)

    def const(self, tid):
        return self._type("", btf.CONST, 0, tid)

    def array(self, elem, n, index):
        return self._type("", btf.ARRAY, 0, 0, struct.pack("<III", elem, index, n))

    def record(self, name, size, members, kind=btf.STRUCT, kflag=False):
        extra = b"".join(struct.pack("<III", self._str(m), t, off) for m, t, off in members)
        return self._type(name, kind, len(members), size, extra, kflag)

    def enum(self, name, values):
        extra = b"".join(struct.pack("<Ii", self._str(n), v) for n, v in values.items())
        return self._type(name, btf.ENUM, len(values), 4, extra)

    def bytes(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", btf.BTF_MAGIC, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + bytes(self.types) + bytes(self.strings)


class Inner(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint16), ("b", ctypes.c_uint32)]


class Outer(ctypes.Structure):
    _fields_ = [("i", Inner), ("c", ctypes.c_uint8), ("d", ctypes.c_uint64),
                ("arr", ctypes.c_uint32 * 3), ("e", ctypes.c_int32), ("s", ctypes.c_int8)]


def _types():
    w = BlobWriter()
    u8, u16, u32 = w.int("unsigned char", 1), w.int("unsigned short", 2), w.int("unsigned int", 4)
    u64, s8 = w.int("unsigned long long", 8), w.int("signed char", 1, signed=True)
    be32 = w.typedef("__be32", w.typedef("__u32", u32))
    e = w.enum("colour", {"RED": 1, "BLUE": -2})
    inner = w.record("inner", 8, [("a", u16, 0), ("b", be32, 32)])
    outer = w.record("outer", ctypes.sizeof(Outer), [
        (n, t, getattr(Outer, n).offset * 8) for n, t in
        (("i", inner), ("c", u8), ("d", u64), ("arr", w.array(w.const(u32), 3, u32)),
         ("e", e), ("s", s8))])
    union = w.record("either", 8, [("x", u32, 0), ("y", u64, 0)], kind=btf.UNION)
    bits = w.record("bits", 4, [("f", u32, 3 << 24)], kflag=True)  # parsed, never built
    parsed = btf.parse(w.bytes())
    return btf.Types(parsed), {"outer": outer, "union": union, "bits": bits, "be32": be32}


def test_struct_layout_is_the_c_layout():
    types, ids = _types()
    cls = types.ctype(ids["outer"])
    assert ctypes.sizeof(cls) == ctypes.sizeof(Outer)
    for name, _ in Outer._fields_:
        assert getattr(cls, name).offset == getattr(Outer, name).offset, name
    assert getattr(cls._fields_[0][1], "b").offset == Inner.b.offset  # the hole after a


def test_values_land_where_c_puts_them():
    types, ids = _types()
    ours, theirs = types.ctype(ids["outer"])(), Outer()
    for v in (ours, theirs):
        v.i.a, v.i.b, v.c, v.d, v.e, v.s = 0x1234, 0xdeadbeef, 7, 2**40 + 3, -2, -1
        v.arr[2] = 99
    assert bytes(ours) == bytes(theirs)


def test_scalars_unions_and_typedefs():
    types, ids = _types()
    assert types.ctype(ids["be32"]) is ctypes.c_uint32
    u = types.ctype(ids["union"])
    assert ctypes.sizeof(u) == 8 and u.x.offset == u.y.offset == 0


def test_bit_fields_are_refused_clearly_when_built():
    """A blob with bit-fields parses (the program's BTF has kernel structs); building a
    map type with one says why it cannot."""
    types, ids = _types()
    with pytest.raises(btf.BtfError, match="bit-field"):
        types.ctype(ids["bits"])


def test_not_btf_is_refused():
    with pytest.raises(btf.BtfError, match="not BTF"):
        btf.parse(bytes(24))
