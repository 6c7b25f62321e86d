"""Reading constants and map declarations from C header text (hyperplane/datapath/cheaders.py)."""
import pytest

from hyperplane.datapath import cheaders

HEADER = r"""
/* a comment with enum fake { X = 9 }; and HP_MAP("hash", a, b, commented, 1, 0); */
#define SIZE 0x10U          /* hex with a suffix */
#define TWICE (SIZE * 2)
#define FLAG_B (1 << 3)
#define NOT_A_NUMBER "text"
#define EMPTY
#define MACRO(x) ((x) + 1)
enum colours {
	RED = 2,
	GREEN,                 // implicit: 3
	BLUE = SIZE | FLAG_B,  /* 24 */
	CYAN,
	LAST = CYAN + 1,
};
#ifdef PINNED
#define HP_MAP(type, key, leaf, name, size, flags) \
	BPF_TABLE_PINNED7(type, key, leaf, name, size, "x/" #name, flags)
#endif
HP_MAP("hash", struct flow_key, struct flow_value, flows, SIZE * 2, 0);
// HP_MAP("hash", u32, u32, disabled, 1, 0);
HP_MAP("percpu_array", u32, u64,
       counters, TWICE, BPF_F_NO_PREALLOC);
"""


def test_defines_keep_integer_expressions_only():
    d = cheaders.parse_defines(cheaders.strip_comments(HEADER))
    assert d == {"SIZE": 16, "TWICE": 32, "FLAG_B": 8}


def test_enum_values_explicit_implicit_and_computed():
    e = cheaders.parse_enum(cheaders.strip_comments(HEADER), "colours")
    assert e == {"RED": 2, "GREEN": 3, "BLUE": 24, "CYAN": 25, "LAST": 26}
    assert list(e) == ["RED", "GREEN", "BLUE", "CYAN", "LAST"]


def test_unknown_enum_and_bad_expression_are_errors():
    with pytest.raises(cheaders.HeaderError):
        cheaders.parse_enum(HEADER, "nope")
    with pytest.raises(cheaders.HeaderError):
        cheaders.evaluate("sizeof(int)", {})
    with pytest.raises(cheaders.HeaderError):
        cheaders.evaluate("__import__('os')", {})


def test_map_declarations_skip_the_macro_and_comments():
    decls = cheaders.parse_map_declarations(cheaders.strip_comments(HEADER))
    assert [(d.type, d.key, d.leaf, d.name, d.size, d.flags) for d in decls] == [
        ("hash", "struct flow_key", "struct flow_value", "flows", "SIZE * 2", "0"),
        ("percpu_array", "u32", "u64", "counters", "TWICE", "BPF_F_NO_PREALLOC")]


def test_the_real_headers_read():
    """The data path's own headers parse: every enum of consts.h and the maps of maps.h."""
    for name in cheaders.enum_names("consts.h"):
        assert cheaders.enum("consts.h", name), name
    names = [d.name for d in cheaders.map_declarations()]
    assert "flows" in names and "verdicts" in names and len(names) == len(set(names))
    members = dict((n, t) for t, n in cheaders.struct_members("structs.h", "flow_key"))
    assert members["src_ip"] == "__be32" and members["pad[3]"] == "__u8"
