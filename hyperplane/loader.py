"""Compile the data path with bcc, pin its maps, attach it to interfaces, detach it."""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, fields
from importlib import resources

from .errors import ConfigError, EnvironmentProblem

PIN_ROOT = "/run/hyperplane/bpf"
PROGRAM = b"xdp_hyperplane"
XDP_MODES = {"generic": 1 << 1, "native": 1 << 2}  # XDP_FLAGS_SKB_MODE / XDP_FLAGS_DRV_MODE


def bpf_dir() -> str:
    """Absolute path of the C sources, from a checkout or an installed wheel alike."""
    return str(resources.files("hyperplane.bpf"))


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$')


def program_text(main: str = "hyperplane.bpf.c") -> str:
    """The program as one text, with our own headers inlined (#line keeps error positions).

    bcc rewrites map method calls (flows.lookup(...)) only in the main file it is given,
    not in headers it includes, so the headers are spliced in before compiling."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:  # the headers have include guards; splice each once
            return ""
        seen.add(name)
        with open(os.path.join(bpf_dir(), name)) as f:
            lines = f.read().split("\n")
        out = [f'#line 1 "{name}"']
        for number, line in enumerate(lines, start=1):
            m = _LOCAL_INCLUDE.match(line)
            if m:
                out.append(expand(m.group(1)))
                out.append(f'#line {number + 1} "{name}"')
            else:
                out.append(line)
        return "\n".join(out)

    return expand(main)


@dataclass(frozen=True)
class Sizes:
    """Map sizes, passed to the C as -D flags (bpf/consts.h holds the same defaults)."""
    max_flows: int = 262144
    max_reservations: int = 131072
    max_gateways: int = 16
    max_nat_ips: int = 8
    max_inside_prefixes: int = 256
    port_probes: int = 32
    max_frags: int = 4096
    ringbuf_pages: int = 256
    max_listeners: int = 64
    maglev_size: int = 65537
    max_targets: int = 1024
    max_lbs: int = 16

    def cflags(self) -> list[str]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"size {f.name} must be a positive integer, not {value!r}")
            out.append(f"-DHP_{f.name.upper()}={value}")
        return out


def _import_bcc():
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc)
    except ImportError as exc:
        raise EnvironmentProblem(
            "bcc is not importable; install Debian's python3-bpfcc and use a venv made with "
            "--system-site-packages (scripts/setup.sh does both).") from exc
    return bcc


class Datapath:
    """One compiled instance of bpf/hyperplane.bpf.c and its maps.

    With pin_dir set, the state maps live there and survive this process: a new Datapath
    with the same pin_dir finds every flow again."""

    def __init__(self, sizes: Sizes | None = None, pin_dir: str | None = None,
                 extra_cflags: list[str] | None = None, load_program: bool = True):
        if os.geteuid() != 0:
            raise EnvironmentProblem("loading XDP programs needs root; run as root (sudo).")
        bcc = _import_bcc()
        self.sizes = sizes or Sizes()
        self.pin_dir = pin_dir
        cflags = [f"-I{bpf_dir()}", *self.sizes.cflags(), *(extra_cflags or [])]
        if pin_dir:
            _ensure_bpffs_dir(pin_dir)
            cflags.append(f'-DHP_PIN_DIR="{pin_dir}"')
        try:
            self.bpf = bcc.BPF(text=program_text().encode(), cflags=cflags)
        except Exception as exc:
            if "headers" in str(exc).lower() or not os.path.exists(
                    f"/lib/modules/{os.uname().release}/build"):
                raise EnvironmentProblem(
                    f"bcc cannot compile: kernel headers are missing at /lib/modules/"
                    f"{os.uname().release}/build; run scripts/setup.sh.") from exc
            raise
        if pin_dir:
            self._check_pins()
        # load_program=False only opens the (pinned) maps, e.g. for hpctl's read commands
        self.fn = self.bpf.load_func(PROGRAM, bcc.BPF.XDP) if load_program else None
        self.attached: list[tuple[str, int]] = []

    PINNED = ("flows", "nat_resv", "gateways", "nat_ips", "inside_nets", "config", "verdicts",
              "gw_stats", "frags", "vips", "listeners", "maglev", "targets", "lb_stats",
              "target_packets", "stats")

    def _check_pins(self) -> None:
        """bcc reuses a pinned map by its path without comparing it to the definition; a map
        pinned by another version or with other sizes is refused here, clearly."""
        import ctypes
        for name in self.PINNED:
            t = self.table(name)
            info = map_info(t.map_fd)
            leaf = t.Leaf
            if t.ttype in PERCPU_TYPES and issubclass(leaf, ctypes.Array):
                leaf = leaf._type_  # bcc's per-CPU Leaf is one value per possible CPU
            want = (t.ttype, ctypes.sizeof(t.Key), ctypes.sizeof(leaf), t.max_entries)
            have = (info.type, info.key_size, info.value_size, info.max_entries)
            if have != want:
                raise ConfigError(
                    f"the pinned map {self.pin_dir}/{name} (type {have[0]}, key {have[1]} B, "
                    f"value {have[2]} B, {have[3]} entries) does not match this program's "
                    f"(type {want[0]}, key {want[1]} B, value {want[2]} B, {want[3]} entries): "
                    f"it was made by another version or with other sizes; stop the node "
                    f"(hpctl nat down) or remove {self.pin_dir}, then start again")

    @property
    def prog_fd(self) -> int:
        return self.fn.fd

    def table(self, name: str):
        return self.bpf[name.encode()]

    def attach(self, ifname: str, mode: str = "generic") -> None:
        if mode not in XDP_MODES:
            raise ConfigError(f"XDP mode must be one of {', '.join(XDP_MODES)}, not {mode!r}")
        try:
            self.bpf.attach_xdp(ifname.encode(), self.fn, XDP_MODES[mode])
        except Exception as exc:
            raise ConfigError(f"cannot attach XDP ({mode}) to {ifname}: {exc}") from exc
        self.attached.append((ifname, XDP_MODES[mode]))

    def detach_all(self) -> None:
        import bcc
        while self.attached:
            ifname, flags = self.attached.pop()
            try:
                bcc.BPF.remove_xdp(ifname.encode(), flags)
            except Exception:
                pass  # the interface is gone (namespace deleted): nothing attached

    def close(self) -> None:
        self.detach_all()
        self.bpf.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PERCPU_TYPES = (5, 6)  # BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY


def map_info(fd: int):
    """struct bpf_map_info of a map fd (libbpf's bpf_obj_get_info_by_fd)."""
    import ctypes

    class MapInfo(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                    ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                    ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                    ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 64)]

    from .testrun import _libbpf
    info = MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if _libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "bpf_obj_get_info_by_fd failed")
    return info


def _ensure_bpffs_dir(pin_dir: str) -> None:
    root = os.path.dirname(pin_dir.rstrip("/"))
    os.makedirs(root, exist_ok=True)
    if not _is_bpffs(root):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(b"bpf", root.encode(), b"bpf", 0, None) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot mount a bpffs at {root} for pinning ({exc}); "
                f"run: mount -t bpf bpf {root}") from exc
    os.makedirs(pin_dir, exist_ok=True)


def _is_bpffs(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "bpf" for line in f)


def remove_pins(pin_dir: str) -> None:
    """Unpin every map of a node (the maps die with their last user)."""
    if not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        try:
            os.unlink(os.path.join(pin_dir, name))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    os.rmdir(pin_dir)
