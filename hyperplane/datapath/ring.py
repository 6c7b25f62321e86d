"""A BPF ring buffer read by mapping it: every record that is there, copied out in one
piece per read, instead of one callback per record (libbpf's ring_buffer__consume, which
costs a ctypes callback, several microseconds of Python, per event).

The layout is the kernel's (kernel/bpf/ringbuf.c): the map's first page holds the
consumer position (the reader writes it), the second the producer position, and the data
pages follow, mapped twice in a row so that a record that wraps reads as one piece. Each
record starts with an 8-byte header: its length with two flag bits (BUSY: reserved but not
submitted yet; DISCARD: skip it), then a page offset, and records are 8-byte aligned.

All the data path's events have one size (struct flow_event), so a read normally hands on
a run of equal records in one `RingBatch`, and what a reader wants from every record (its
type, a flag byte) is taken a column at a time by bytes slicing: no Python per record. A
record of another size (a program built from older headers) is padded or cut to the
reader's size, as libbpf's reader would hand it on with its own size.

Ordering: the reader loads the producer position, then the headers and data, then stores
the consumer position, with plain loads and an aligned 8-byte store. That is enough on
x86-64 (loads are not reordered with loads, nor stores with earlier loads), which is why
`mapped_reading()` is true only there; elsewhere the libbpf reader is used.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
from dataclasses import dataclass

RINGBUF_MAP_TYPE = 27          # BPF_MAP_TYPE_RINGBUF
HDR_SIZE = 8                   # BPF_RINGBUF_HDR_SZ
BUSY = 1 << 31                 # BPF_RINGBUF_BUSY_BIT
DISCARD = 1 << 30              # BPF_RINGBUF_DISCARD_BIT
PAGE = mmap.PAGESIZE
MAX_BATCH = 8192               # records per read: bounds one read's copy and latency


def mapped_reading() -> bool:
    """Whether this machine's memory ordering lets MappedRing read without barriers."""
    return platform.machine() in ("x86_64", "AMD64")


def stride_of(size: int) -> int:
    """Bytes from one record of `size` bytes to the next (header included)."""
    return (size + HDR_SIZE + 7) & ~7


@dataclass(frozen=True)
class RingBatch:
    """`count` records of `size` bytes, record i at data[first + i * stride]."""
    data: bytes
    first: int
    stride: int
    count: int
    size: int

    def column(self, offset: int) -> bytes:
        """The byte at `offset` of every record, one byte per record."""
        start = self.first + offset
        return self.data[start:start + self.count * self.stride:self.stride]

    def records(self) -> list[bytes]:
        """Each record's bytes (for readers that want whole events)."""
        d, size = self.data, self.size
        return [d[o:o + size] for o in range(self.first, self.first + self.count * self.stride,
                                              self.stride)]

    def fields(self, offset: int, width: int, keep: bytes | None = None) -> bytes:
        """Bytes [offset, offset + width) of every record (of those whose byte in `keep`
        is non-zero, when given), concatenated."""
        d, start, stop = self.data, self.first + offset, self.first + self.count * self.stride
        if keep is None:
            return b"".join([d[o:o + width] for o in range(start, stop, self.stride)])
        return b"".join([d[o:o + width] for o, k in zip(range(start, stop, self.stride), keep)
                         if k])


EMPTY = RingBatch(b"", HDR_SIZE, stride_of(0), 0, 0)


def _uniform_run(chunk: bytes, pos: int, size: int, stride: int) -> int:
    """How many records from chunk[pos:] in a row are submitted records of `size` bytes:
    each header's length word compared a byte column at a time (C speed)."""
    n = (len(chunk) - pos) // stride
    if n <= 0:
        return 0
    want = size.to_bytes(4, "little")      # no BUSY or DISCARD bit
    run = n
    for k in range(4):
        col = chunk[pos + k:pos + n * stride:stride]
        run = min(run, n - len(col.lstrip(want[k:k + 1])))
        if not run:
            break
    return run


def parse(chunk: bytes, size: int, limit: int = MAX_BATCH) -> tuple[RingBatch, int]:
    """The submitted records at the start of `chunk` (ring bytes from the consumer
    position), as one batch of `size`-byte records, and the bytes they (and any discarded
    records among them) take: the consumer position's advance. Stops at a record still
    BUSY, at a record cut off by the chunk's end, or after `limit` records."""
    stride = stride_of(size)
    run = min(_uniform_run(chunk, 0, size, stride), limit)
    pos = run * stride
    if pos == len(chunk) or run == limit:      # the usual case: nothing irregular
        return RingBatch(chunk, HDR_SIZE, stride, run, size), pos
    # something irregular follows: rebuild a uniform copy, record by record where needed
    out = bytearray(chunk[:pos])
    count = run
    while count < limit and pos + HDR_SIZE <= len(chunk):
        word = int.from_bytes(chunk[pos:pos + 4], "little")
        if word & BUSY:
            break
        length = word & ~(BUSY | DISCARD)
        step = stride_of(length)
        if pos + step > len(chunk):
            break
        if not word & DISCARD:
            if length == size:
                more = min(_uniform_run(chunk, pos, size, stride), limit - count)
                out += chunk[pos:pos + more * stride]
                count += more
                pos += more * stride
                continue
            body = chunk[pos + HDR_SIZE:pos + HDR_SIZE + min(length, size)]
            out += size.to_bytes(4, "little") + bytes(4) + body.ljust(stride - HDR_SIZE, b"\0")
            count += 1
        pos += step
    return RingBatch(bytes(out), HDR_SIZE, stride, count, size), pos


_libc = None


def _mmap_fn():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def _map(fd: int, length: int, prot: int, offset: int) -> int:
    lib = _mmap_fn()
    addr = lib.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the ring buffer: {os.strerror(err)}")
    return addr


class MappedRing:
    """One reader of the ring buffer map `fd` (which stays the caller's), for records of
    `size` bytes. read() returns what is there as a RingBatch and frees its space."""

    def __init__(self, fd: int, size: int, data_size: int | None = None):
        if data_size is None:
            from hyperplane.datapath.pinned import map_info
            info = map_info(fd)
            if info.type != RINGBUF_MAP_TYPE:
                raise ValueError(f"map fd {fd} is not a ring buffer (type {info.type})")
            data_size = info.max_entries
        if data_size <= 0 or data_size & (data_size - 1) or data_size % PAGE:
            raise ValueError(f"a ring buffer's size is a power of 2 pages, not {data_size}")
        self.fd, self.data_size, self.size = fd, data_size, size
        self._mask = data_size - 1
        self._cons_addr = _map(fd, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        try:
            self._prod_addr = _map(fd, PAGE + 2 * data_size, mmap.PROT_READ, PAGE)
        except OSError:
            _mmap_fn().munmap(self._cons_addr, PAGE)
            raise
        self._data_addr = self._prod_addr + PAGE
        self._cons = ctypes.c_uint64.from_address(self._cons_addr)
        self._prod = ctypes.c_uint64.from_address(self._prod_addr)

    def pending_bytes(self) -> int:
        return self._prod.value - self._cons.value

    def read(self, limit: int = MAX_BATCH) -> RingBatch:
        cons = self._cons.value
        avail = self._prod.value - cons
        if avail <= 0:
            return EMPTY
        span = min(avail, limit * stride_of(self.size))
        # one copy of the bytes from the consumer position (the double mapping makes a
        # wrapped record contiguous); a record cut by `span` is read next time
        chunk = ctypes.string_at(self._data_addr + (cons & self._mask), span)
        batch, used = parse(chunk, self.size, limit)
        if not used and avail > span:
            # the first record is longer than the span (no program of ours writes one):
            # read it alone, so that it cannot hold the ring up
            word = int.from_bytes(chunk[:4], "little")
            if not word & BUSY:
                step = stride_of(word & ~(BUSY | DISCARD))
                chunk = ctypes.string_at(self._data_addr + (cons & self._mask), step)
                batch, used = parse(chunk, self.size, 1)
        if used:
            self._cons.value = cons + used     # one aligned 8-byte store
        return batch

    def close(self) -> None:
        if self._cons_addr:
            lib = _mmap_fn()
            lib.munmap(self._prod_addr, PAGE + 2 * self.data_size)
            lib.munmap(self._cons_addr, PAGE)
            self._cons_addr = self._prod_addr = 0
            self._cons = self._prod = None
