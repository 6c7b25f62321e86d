"""A node's pinned maps, opened directly: no bcc, no compiling.

Reading a counter through bcc meant compiling the whole program first (~3 s, ~250 MB).
The maps are pinned on a bpffs (bpf/maps.h) and carry the program's BTF, so here each one
is opened with bpf_obj_get, its key and value types are built from that BTF (the layout
comes from the C structs; nothing is redefined in Python) and it is read and written
through libbpf (libbpf1, already a dependency of Debian's bcc) with ctypes.

PinnedMap answers like a bcc table (Key, Leaf, [key], items(), items_*_batch, pop,
clear; per-CPU values as one entry per possible CPU), so the code that reads and writes
maps works on a compiled Datapath and on a PinnedNode alike.
"""
from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import MutableMapping

from hyperplane.datapath import btf
from hyperplane.datapath.cheaders import map_declarations
from hyperplane.errors import EnvironmentProblem, NotFound

# BPF_MAP_TYPE_* (linux/bpf.h)
HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE = 1, 2, 5, 6, 9, 10, 11
PERCPU_TYPES = (PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH)
ARRAY_TYPES = (ARRAY, PERCPU_ARRAY)
BATCH_TYPES = (HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LRU_PERCPU_HASH)
BATCH_ENTRIES = 4096   # entries per BPF_MAP_LOOKUP_BATCH call (grown if a bucket is bigger)
_NO_BATCH = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524)  # 524: kernel ENOTSUPP


def pinned_map_names() -> tuple[str, ...]:
    """Every map the data path pins (each HP_MAP of bpf/maps.h), in declaration order."""
    return tuple(d.name for d in map_declarations())


def delete_batch(map_fd: int, keys, count: int, start: int = 0) -> tuple[int, int]:
    """BPF_MAP_DELETE_BATCH of `count` keys of a ctypes array from index `start`, on any
    map fd (bcc's or a pinned one): (keys deleted, errno or 0). The kernel deletes in
    order and stops at the first key it cannot delete (ENOENT: gone already); what it
    deleted before is reported, so a caller can tell its deletions from the data path's."""
    n = ctypes.c_uint32(count)
    at = ctypes.byref(keys, start * ctypes.sizeof(keys._type_))
    ret = _libbpf().bpf_map_delete_batch(map_fd, at, ctypes.byref(n), None)
    if ret < 0 and n.value >= count:  # the kernel names no failing key: call it none done
        n.value = 0
    return n.value, (-ret if ret < 0 else 0)


class _MapInfo(ctypes.Structure):
    # struct bpf_map_info (linux/bpf.h)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64)]


class _BtfInfo(ctypes.Structure):
    # struct bpf_btf_info (linux/bpf.h)
    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("name", ctypes.c_uint64), ("name_len", ctypes.c_uint32),
                ("kernel_btf", ctypes.c_uint32)]


_lib = None


def _libbpf():
    """libbpf with the signatures used here (libbpf 1.x returns -errno on failure)."""
    global _lib
    if _lib is None:
        from hyperplane.datapath.testrun import _libbpf as load
        lib = load()
        vp, u32p, i = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_int
        for fn, args in {"bpf_obj_get": [ctypes.c_char_p],
                         "bpf_obj_pin": [i, ctypes.c_char_p],
                         "bpf_obj_get_info_by_fd": [i, vp, u32p],
                         "bpf_btf_get_fd_by_id": [ctypes.c_uint32],
                         "bpf_map_lookup_elem": [i, vp, vp],
                         "bpf_map_update_elem": [i, vp, vp, ctypes.c_uint64],
                         "bpf_map_delete_elem": [i, vp],
                         "bpf_map_get_next_key": [i, vp, vp],
                         "bpf_map_lookup_batch": [i, vp, vp, vp, vp, u32p, vp],
                         "bpf_map_update_batch": [i, vp, vp, u32p, vp],
                         "bpf_map_delete_batch": [i, vp, u32p, vp],
                         "libbpf_num_possible_cpus": []}.items():
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = ctypes.c_int
        _lib = lib
    return _lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _info(fd: int, info):
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
           "bpf_obj_get_info_by_fd")
    return info


def map_info(fd: int):
    """struct bpf_map_info of any map fd (type, key/value sizes, max_entries, ...)."""
    return _info(fd, _MapInfo())


_btf_cache: dict[int, btf.Types] = {}


def program_btf(btf_id: int) -> btf.Types:
    """The BTF a program was loaded with (by id), parsed; one parse per id and process."""
    if btf_id not in _btf_cache:
        fd = _check(_libbpf().bpf_btf_get_fd_by_id(btf_id), f"BTF id {btf_id}")
        try:
            size = _info(fd, _BtfInfo()).btf_size
            raw = ctypes.create_string_buffer(size)
            info = _BtfInfo(btf=ctypes.addressof(raw), btf_size=size)
            _info(fd, info)
        finally:
            os.close(fd)
        _btf_cache[btf_id] = btf.Types(btf.parse(raw.raw[:info.btf_size]))
    return _btf_cache[btf_id]


def map_btf_id(fd: int) -> int:
    """The id of the BTF a map's key and value types live in (0: the map has none)."""
    return _info(fd, _MapInfo()).btf_id


def num_possible_cpus() -> int:
    return _check(_libbpf().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def _percpu_slot(value: type) -> type:
    """One CPU's value in a per-CPU map: the kernel rounds each up to 8 bytes."""
    if ctypes.sizeof(value) % 8 == 0:
        return value
    if issubclass(value, ctypes._SimpleCData):
        return ctypes.c_int64 if value(-1).value < 0 else ctypes.c_uint64
    pad = 8 - ctypes.sizeof(value) % 8
    return type(value.__name__, (value,), {"_pack_": 1, "_fields_": [("_cpu_pad", ctypes.c_uint8 * pad)]})


class PinnedMap(MutableMapping):
    """One pinned map, with bcc's table interface (see the module's docstring)."""

    def __init__(self, path: str, name: str | None = None):
        self.name = name or os.path.basename(path)
        fd = _libbpf().bpf_obj_get(path.encode())
        if fd < 0:
            if -fd == errno.ENOENT:
                raise NotFound(f"no pinned map at {path}")
            if -fd in (errno.EPERM, errno.EACCES):
                raise EnvironmentProblem(f"reading the node's maps ({path}) needs root; run "
                                         f"as root (sudo).")
            _check(fd, f"bpf_obj_get({path})")
        self.map_fd = fd
        try:
            info = _info(fd, _MapInfo())
            if not info.btf_id or not info.btf_value_type_id:
                raise NotFound(f"the pinned map {path} carries no BTF, so its layout is "
                               f"unknown; restart the node with this version")
            types = program_btf(info.btf_id)
            self.ttype, self.max_entries, self.flags = info.type, info.max_entries, info.map_flags
            self.Key = types.ctype(info.btf_key_type_id)
            self.Value = types.ctype(info.btf_value_type_id)   # one CPU's value
            self.total_cpu = num_possible_cpus() if self.percpu else 1
            self.Leaf = _percpu_slot(self.Value) * self.total_cpu if self.percpu else self.Value
            if (ctypes.sizeof(self.Key), ctypes.sizeof(self.Value)) != \
                    (info.key_size, info.value_size):
                raise btf.BtfError(f"{path}: BTF sizes differ from the map's")
        except BaseException:
            os.close(fd)
            raise

    sLeaf = property(lambda self: self.Value)  # bcc's name for one CPU's value

    @property
    def percpu(self) -> bool:
        return self.ttype in PERCPU_TYPES

    def close(self) -> None:
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1

    # --- single entries ------------------------------------------------------------------
    def _key(self, key):
        if isinstance(key, int):  # an array index, or a scalar key
            key = self.Key(key)
        if not isinstance(key, self.Key):
            key = self.Key.from_buffer_copy(bytes(key))
        if self.ttype in ARRAY_TYPES and not 0 <= key.value < self.max_entries:
            raise IndexError(f"index {key.value} out of range for {self.name}")
        return key

    def __getitem__(self, key):
        leaf = self.Leaf()
        if _libbpf().bpf_map_lookup_elem(self.map_fd, ctypes.byref(self._key(key)),
                                         ctypes.byref(leaf)) < 0:
            raise KeyError(key)
        return leaf

    def __setitem__(self, key, leaf) -> None:
        if isinstance(leaf, int):  # a scalar value
            leaf = self.Leaf(leaf)
        if ctypes.sizeof(leaf) != ctypes.sizeof(self.Leaf):
            raise TypeError(f"{self.name}: a value is {ctypes.sizeof(self.Leaf)} bytes, "
                            f"not {ctypes.sizeof(leaf)}")
        _check(_libbpf().bpf_map_update_elem(self.map_fd, ctypes.byref(self._key(key)),
                                             ctypes.byref(leaf), 0), f"update {self.name}")

    def __delitem__(self, key) -> None:
        if self.ttype in ARRAY_TYPES:  # array entries cannot be deleted: zero them (as bcc)
            self[key] = self.Leaf()
            return
        if _libbpf().bpf_map_delete_elem(self.map_fd, ctypes.byref(self._key(key))) < 0:
            raise KeyError(key)

    def __iter__(self):
        """Keys (bpf_map_get_next_key; an array's every index)."""
        if self.ttype in ARRAY_TYPES:
            yield from (self.Key(i) for i in range(self.max_entries))
            return
        lib, prev = _libbpf(), None
        while True:
            nxt = self.Key()
            if lib.bpf_map_get_next_key(self.map_fd, None if prev is None else ctypes.byref(prev),
                                        ctypes.byref(nxt)) < 0:
                return
            yield nxt
            prev = nxt

    def __len__(self) -> int:
        if self.ttype in ARRAY_TYPES:
            return self.max_entries
        return sum(1 for _ in self)

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    # --- many entries --------------------------------------------------------------------
    def items(self) -> list:
        return list(self.items_lookup_batch())

    def values(self) -> list:
        return [v for _, v in self.items_lookup_batch()]

    def items_lookup_batch(self):
        """(key, value) of every entry: BPF_MAP_LOOKUP_BATCH where the kernel has it (one
        call per BATCH_ENTRIES entries), else get_next_key and a lookup per entry."""
        if self.ttype in BATCH_TYPES:
            batched = self._lookup_batch()
            try:
                first = next(batched)
            except StopIteration:
                return
            except OSError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
            else:
                yield first
                yield from batched
                return
        for k in self:
            try:
                yield k, self[k]
            except KeyError:  # deleted between get_next_key and the lookup
                continue

    def _lookup_batch(self):
        for keys, values, count in self.raw_batches():
            ksize, vsize = ctypes.sizeof(self.Key), ctypes.sizeof(self.Leaf)
            for i in range(count):
                yield (self.Key.from_buffer(keys, i * ksize),
                       self.Leaf.from_buffer(values, i * vsize))

    def raw_batches(self):
        """(keys, values, count) per BPF_MAP_LOOKUP_BATCH call: the raw buffers, `count`
        entries of sizeof(Key) and sizeof(Leaf) bytes each. For reading many entries
        without a ctypes object per entry (hpctl top's NAT ports per destination: 20,000
        reservations took 280 ms as (Key, Leaf) objects). OSError where the map has no
        batch operations."""
        lib = _libbpf()
        ksize, vsize = ctypes.sizeof(self.Key), ctypes.sizeof(self.Leaf)
        token_in = ctypes.create_string_buffer(max(ksize, 8))
        token_out = ctypes.create_string_buffer(max(ksize, 8))
        n, started = min(BATCH_ENTRIES, self.max_entries), False
        while True:
            keys, values = (ctypes.c_uint8 * (n * ksize))(), (ctypes.c_uint8 * (n * vsize))()
            count = ctypes.c_uint32(n)
            ret = lib.bpf_map_lookup_batch(self.map_fd, token_in if started else None,
                                           token_out, keys, values, ctypes.byref(count), None)
            if ret < 0 and -ret == errno.ENOSPC and count.value == 0:
                n *= 2  # one hash bucket holds more entries than the buffer
                continue
            if ret < 0 and -ret != errno.ENOENT:
                _check(ret, f"BPF_MAP_LOOKUP_BATCH on {self.name}")
            if count.value:
                yield keys, values, count.value
            if ret < 0:  # ENOENT: that was the last of them
                return
            ctypes.memmove(token_in, token_out, len(token_in))
            started = True

    def items_update_batch(self, keys, values) -> None:
        """Write len(keys) entries in BPF_MAP_UPDATE_BATCH calls."""
        if len(keys) != len(values):
            raise ValueError("keys and values differ in length")
        ksize, vsize, done = ctypes.sizeof(self.Key), ctypes.sizeof(self.Leaf), 0
        while done < len(keys):
            count = ctypes.c_uint32(len(keys) - done)
            ret = _libbpf().bpf_map_update_batch(
                self.map_fd, ctypes.byref(keys, done * ksize),
                ctypes.byref(values, done * vsize), ctypes.byref(count), None)
            _check(ret, f"BPF_MAP_UPDATE_BATCH on {self.name}")
            done += count.value

    def items_delete_batch(self, keys=None) -> None:
        """Delete these keys (BPF_MAP_DELETE_BATCH; OSError ENOENT when one is gone), or
        every entry."""
        if keys is None:
            self.clear()
            return
        if len(keys) == 0:
            return
        count = ctypes.c_uint32(len(keys))
        _check(_libbpf().bpf_map_delete_batch(self.map_fd, ctypes.byref(keys),
                                              ctypes.byref(count), None),
               f"BPF_MAP_DELETE_BATCH on {self.name}")

    def clear(self) -> None:
        """Delete every entry (an array's are zeroed)."""
        if self.ttype in ARRAY_TYPES:
            n = self.max_entries
            self.items_update_batch((self.Key * n)(*range(n)), (self.Leaf * n)())
            return
        for k in [k for k, _ in self.items_lookup_batch()]:
            self.pop(k, None)

    def pop(self, key, *default):
        try:
            value = self[key]
            del self[key]
        except KeyError:
            if default:
                return default[0]
            raise
        return value

    def sum(self, key) -> int:
        """A per-CPU integer value summed over the CPUs."""
        return int(sum(self[key]))


def pin_program(fd: int, path: str) -> None:
    """Pin a program at path, replacing what was pinned there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _check(_libbpf().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


class PinnedRing:
    """A pinned BPF ring buffer, read with libbpf's ring_buffer (through bcc's libbcc,
    which has it): callback(data pointer, size) per record on consume(), which never
    blocks (the data path submits without wakeups)."""

    def __init__(self, path: str, callback):
        from bcc import libbcc
        self._lib = libbcc.lib
        self.fd = _check(_libbpf().bpf_obj_get(path.encode()), f"bpf_obj_get({path})")

        def on_record(_ctx, data, size):
            callback(data, size)
            return 0
        self._cb = libbcc._RINGBUF_CB_TYPE(on_record)   # kept: libbpf calls it later
        self._rb = self._lib.bpf_new_ringbuf(self.fd, self._cb, None)
        if not self._rb:
            os.close(self.fd)
            raise OSError(f"cannot read the ring buffer {path}")

    def consume(self) -> int:
        return self._lib.bpf_consume_ringbuf(self._rb)

    def close(self) -> None:
        if self._rb:
            self._lib.bpf_free_ringbuf(self._rb)
            self._rb = None
            os.close(self.fd)


class PinnedNode:
    """The pinned maps of one node (opened on first use), with Datapath's table(name);
    for a fleet agent also the pinned record installer (install_fd) and event ring
    (ring_fd for the mapped reader, open_ring for libbpf's)."""

    # the pinned installer's program type, which records.install's test_run needs: set by
    # install_fd (the node's first hook pinned its own)
    hook = "xdp"

    def __init__(self, pin_dir: str, sizes=None):
        if not os.path.isdir(pin_dir):
            raise NotFound(f"no pinned maps at {pin_dir}")
        self.pin_dir, self.sizes = pin_dir, sizes
        self._maps: dict[str, PinnedMap] = {}
        self._install_fd: int | None = None
        self._rings: list[PinnedRing] = []
        self._ring_fds: dict[str, int] = {}

    def install_fd(self) -> int:
        if self._install_fd is None:
            from hyperplane.datapath.loader import INSTALLER_PINS
            for hook, name in INSTALLER_PINS.items():
                fd = _libbpf().bpf_obj_get(os.path.join(self.pin_dir, name).encode())
                if fd >= 0:
                    self._install_fd, self.hook = fd, hook
                    break
            else:
                raise NotFound(f"no pinned record installer in {self.pin_dir}: start the "
                               f"node's data path again with this version (hpctl nat up)")
        return self._install_fd

    def ring_fd(self, name: str) -> int:
        """The fd of the pinned ring buffer `name` (kept open until close)."""
        if name not in self._ring_fds:
            path = os.path.join(self.pin_dir, name)
            self._ring_fds[name] = _check(_libbpf().bpf_obj_get(path.encode()),
                                          f"bpf_obj_get({path})")
        return self._ring_fds[name]

    def open_ring(self, name: str, callback) -> PinnedRing:
        ring = PinnedRing(os.path.join(self.pin_dir, name), callback)
        self._rings.append(ring)
        return ring

    def table(self, name: str) -> PinnedMap:
        if name not in self._maps:
            self._maps[name] = PinnedMap(os.path.join(self.pin_dir, name), name)
        return self._maps[name]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        for fd in self._ring_fds.values():
            os.close(fd)
        self._ring_fds.clear()
        if self._install_fd is not None:
            os.close(self._install_fd)
            self._install_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
