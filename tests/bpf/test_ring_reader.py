"""The mapped ring reader (hyperplane.datapath.ring) against the kernel's ring buffer: a
tiny program writes records of the sizes the test asks for (or reserves and discards one)
into a one-page ring, driven by BPF_PROG_TEST_RUN, so a few hundred records wrap the ring
many times. Every record must come out once, in order, with its bytes; the mapped reader
and libbpf's (EventRing(mapped=False)) must hand on the same batches."""
from __future__ import annotations

import os
import random

import pytest

from hyperplane.datapath import ring
from hyperplane.datapath import testrun
from hyperplane.observe.events import EVENT_SIZE, EventRing

# The packet's first byte is the record's size, 1-127 (255: reserve one and discard it);
# the record is the packet's first `size` bytes. XDP_PASS: written; XDP_DROP: the ring was full.
WRITER = r"""
#include <uapi/linux/bpf.h>
BPF_RINGBUF_OUTPUT(flow_events, 1);
struct rec { unsigned char b[128]; };
int write_record(struct xdp_md *ctx)
{
	struct rec r;
	if (bpf_xdp_load_bytes(ctx, 0, &r, sizeof(r)))
		return XDP_ABORTED;
	__u32 size = r.b[0];
	if (size == 255) {
		void *x = flow_events.ringbuf_reserve(64);
		if (!x)
			return XDP_DROP;
		flow_events.ringbuf_discard(x, 0);
		return XDP_PASS;
	}
	size &= 127;   /* verifier: clang's "size > 128" test left the bound unproven */
	return flow_events.ringbuf_output(&r, size, 0) ? XDP_DROP : XDP_PASS;
}
"""
XDP_PASS = 2


class _TinyDatapath:
    """What EventRing needs of a data path: table("flow_events") and bpf."""

    def __init__(self, bpf):
        self.bpf = bpf

    def table(self, name):
        return self.bpf[name]


@pytest.fixture
def writer():
    """A fresh program and ring per test (bcc lets one BPF object open a ring's libbpf
    reader only once; compiling this one takes a fraction of a second)."""
    if os.geteuid() != 0:
        pytest.fail("the ring reader tests load a BPF program: run them as root", pytrace=False)
    from bcc import BPF
    bpf = BPF(text=WRITER)
    fn = bpf.load_func("write_record", BPF.XDP)
    yield bpf, fn.fd
    bpf.cleanup()


def _write(prog_fd: int, size: int, tag: int) -> bytes:
    """One record of `size` bytes (0: a discarded one) tagged with `tag`; returns the
    record's bytes (b"" for a discard)."""
    body = bytes([size or 255]) + tag.to_bytes(4, "little") + bytes((tag + i) & 0xFF for i in range(123))
    res = testrun.test_run(prog_fd, body)
    assert res.retval == XDP_PASS, f"the one-page ring was full writing record {tag}"
    return body[:size] if size else b""


def _records(batch) -> list[bytes]:
    return batch.records()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "libbpf"])
def test_every_record_once_in_order_across_many_wraps(writer, mapped):
    """Records of the data path's event size, a few at a time, then read: 600 records of
    112 bytes (with headers) go round a 4,096-byte ring 16 times."""
    bpf, prog_fd = writer
    reader = EventRing(_TinyDatapath(bpf), mapped=mapped)
    try:
        assert not reader.read().count            # nothing left by another test
        rng = random.Random(7)
        sent, got = [], []
        tag = 0
        while tag < 600:
            for _ in range(rng.randint(1, 30)):      # at most 30 records fit in a page
                sent.append(_write(prog_fd, EVENT_SIZE, tag))
                tag += 1
            batch = reader.read()
            assert batch.size == EVENT_SIZE and batch.stride == ring.stride_of(EVENT_SIZE)
            got += _records(batch)
        got += _records(reader.read())
        assert len(got) == len(sent)
        assert got == sent
    finally:
        reader.close()


def test_discarded_and_other_sizes_read_like_libbpf(writer):
    """Discarded records are skipped; a shorter record is padded and a longer one cut to
    the reader's size, as EventRing's libbpf reader does. Both readers read the same
    sequence, written twice."""
    bpf, prog_fd = writer
    sizes = [EVENT_SIZE, 0, EVENT_SIZE, 40, EVENT_SIZE, 127, 0, 0, EVENT_SIZE, 1, EVENT_SIZE]
    out = {}
    mapped_reader = EventRing(_TinyDatapath(bpf), mapped=True)
    libbpf_reader = EventRing(_TinyDatapath(bpf), mapped=False)
    try:
        for mapped, reader in ((True, mapped_reader), (False, libbpf_reader)):
            # each reader reads the records written since the other one read
            sent = [_write(prog_fd, size, i) for i, size in enumerate(sizes)]
            batch = reader.read()
            out[mapped] = _records(batch)
    finally:
        mapped_reader.close()
    want = [s[:EVENT_SIZE].ljust(EVENT_SIZE, b"\0") for s in sent if s]
    assert out[True] == want
    assert out[False] == want


def test_a_full_ring_read_in_bounded_batches(writer):
    """A full ring read with a limit: each read returns at most `limit` records and frees
    their space, and the next read goes on where it stopped."""
    bpf, prog_fd = writer
    from hyperplane.datapath.ring import MappedRing
    reader = MappedRing(bpf["flow_events"].map_fd, EVENT_SIZE)
    try:
        while reader.read().count:
            pass
        sent = []
        while True:
            body = bytes([EVENT_SIZE]) + len(sent).to_bytes(4, "little") + bytes(123)
            if testrun.test_run(prog_fd, body).retval != XDP_PASS:
                break                                # full
            sent.append(body[:EVENT_SIZE])
        assert len(sent) == 4096 // ring.stride_of(EVENT_SIZE)
        assert reader.pending_bytes() == len(sent) * ring.stride_of(EVENT_SIZE)
        got = []
        while True:
            batch = reader.read(limit=7)
            if not batch.count:
                break
            assert batch.count <= 7
            got += batch.records()
        assert got == sent
        assert reader.pending_bytes() == 0
    finally:
        reader.close()


def test_a_record_longer_than_a_reads_span_does_not_hold_the_ring_up(writer):
    """A read copies at most `limit` records' worth; a longer record at the consumer
    position is read alone (cut to the reader's size) instead of being waited for."""
    bpf, prog_fd = writer
    from hyperplane.datapath.ring import MappedRing
    reader = MappedRing(bpf["flow_events"].map_fd, EVENT_SIZE)
    try:
        sent = [_write(prog_fd, 127, 1), _write(prog_fd, EVENT_SIZE, 2), _write(prog_fd, 127, 3)]
        got = []
        for _ in range(5):
            got += reader.read(limit=1).records()
        assert got == [s[:EVENT_SIZE] for s in sent]
        assert reader.pending_bytes() == 0
    finally:
        reader.close()
