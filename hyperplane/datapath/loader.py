"""Compile the data path with bcc, pin its maps, attach it to interfaces, detach it."""
from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass, fields
from importlib import resources

from hyperplane.errors import ConfigError, EnvironmentProblem
from hyperplane.datapath.pinned import pinned_map_names

PIN_ROOT = "/run/hyperplane/bpf"
# The same C is built for two hooks (bpf/hook.h): native XDP, and tc ingress for devices
# without native XDP or whose packets may be GSO superpackets with partial checksums
# (veth; a NIC with GRO), which generic XDP cannot translate correctly.
HOOKS = ("xdp", "tc")
# Per hook: the main program, then the slow paths it tail-calls, in the order of their
# slots in the `progs` map. Keep in sync: bpf/hyperplane.bpf.c PROG_*.
PROGRAMS = {hook: tuple(f"{hook}_{name}".encode() for name in
                        ("hyperplane", "hp_new", "hp_reply", "hp_wscale", "hp_owner",
                         "hp_nat", "hp_nat_flow"))
            for hook in HOOKS}
PROG_SLOTS = {0: 2, 1: 0, 2: 1, 3: 3, 4: 4, 5: 5, 6: 6}  # index in PROGRAMS[hook] -> slot in progs (PROG_*)
# Fleet: installs flow records from peers; never attached, run with BPF_PROG_TEST_RUN.
INSTALL_PROGRAM = {hook: f"{hook}_hp_install".encode() for hook in HOOKS}
# The pinned record installer, of the node's first hook's program type (it only runs by
# test_run): a node attached at tc compiles no XDP build for it.
INSTALLER_PINS = {"xdp": "prog_install", "tc": "prog_install_tc"}
# Attach modes: a hook, or "auto" (native XDP where the driver has it, tc elsewhere).
MODES = ("auto", "xdp", "tc")
# XDP attach flags, to detach whatever mode an older version attached in.
XDP_MODES = {"generic": 1 << 1, "native": 1 << 2}  # XDP_FLAGS_SKB_MODE / XDP_FLAGS_DRV_MODE
TC_PRIORITY = 0xc0de  # our filter's preference on the clsact ingress hook
TC_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
# Drivers whose native XDP sees every packet with a full checksum (virtual devices that
# hand over skbs - veth, bridges, tunnels - go to tc).
_TC_DRIVERS = {"veth", "bridge", "tun", "dummy", "vxlan", "geneve", "macvlan", "ipvlan"}


def validate_mode(mode: str) -> str:
    """An attach mode, or a ConfigError that says which exist."""
    if mode == "native":  # the old name of native XDP
        return "xdp"
    if mode == "generic":
        raise ConfigError("generic XDP cannot translate GSO packets with partial checksums "
                          "correctly; use mode tc (or auto) for this interface")
    if mode not in MODES:
        raise ConfigError(f"attach mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def choose_hook(ifname: str, mode: str) -> str:
    """The hook for an interface (in the calling thread's namespace) under mode."""
    mode = validate_mode(mode)
    if mode != "auto":
        return mode
    driver = interface_driver(ifname)
    return "tc" if not driver or driver in _TC_DRIVERS else "xdp"


def interface_driver(ifname: str) -> str:
    """The interface's driver (what `ethtool -i` prints), '' when unknown. Asked through
    an ioctl on a socket, which lives in the calling thread's network namespace (/sys may
    show another namespace's devices)."""
    import array
    import fcntl
    import socket
    import struct
    ethtool_gdrvinfo, siocethtool = 0x00000003, 0x8946
    info = array.array("B", struct.pack("I", ethtool_gdrvinfo) + bytes(192))
    ifreq = struct.pack("16sP", ifname.encode()[:15], info.buffer_info()[0])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), siocethtool, ifreq)
    except OSError:
        return ""
    return bytes(info[4:36]).split(b"\0", 1)[0].decode(errors="replace")


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
    ringbuf_pages: int = 1024
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
    """bpf/hyperplane.bpf.c compiled for a hook, and its maps.

    With pin_dir set, the state maps live there and survive this process: a new Datapath
    with the same pin_dir finds every flow again, and the other hook's build (compiled
    when an interface needs it) shares them."""

    def __init__(self, sizes: Sizes | None = None, pin_dir: str | None = None,
                 extra_cflags: list[str] | None = None, load_program: bool = True,
                 hook: str = "xdp"):
        if os.geteuid() != 0:
            raise EnvironmentProblem("loading BPF programs needs root; run as root (sudo).")
        if hook not in HOOKS:
            raise ConfigError(f"hook must be one of {', '.join(HOOKS)}, not {hook!r}")
        self.sizes = sizes or Sizes()
        self.pin_dir = pin_dir
        self.hook = hook
        self.extra_cflags = list(extra_cflags or [])
        if pin_dir:
            _ensure_bpffs_dir(pin_dir)
        self.builds: dict[str, object] = {}
        self.fns: dict[str, object] = {}
        self.bpf = self._compile(hook)
        if pin_dir:
            self._check_pins()
        # load_program=False only opens the (pinned) maps
        if load_program:
            self._load(hook)
        self.fn = self.fns.get(hook)
        self.install_fn = None
        self.attached: list[tuple[str, str, int]] = []  # (ifname, hook, ifindex or flags)

    def _compile(self, hook: str):
        bcc = _import_bcc()
        cflags = [f"-I{bpf_dir()}", *self.sizes.cflags(), *self.extra_cflags]
        if hook == "tc":
            cflags.append("-DHP_HOOK_TC")
        if self.pin_dir:
            cflags.append(f'-DHP_PIN_DIR="{self.pin_dir}"')
        try:
            build = bcc.BPF(text=program_text().encode(), cflags=cflags)
        except Exception as exc:
            if "headers" in str(exc).lower() or not os.path.exists(
                    f"/lib/modules/{os.uname().release}/build"):
                raise EnvironmentProblem(
                    f"bcc cannot compile: kernel headers are missing at /lib/modules/"
                    f"{os.uname().release}/build; run scripts/setup.sh.") from exc
            raise
        self.builds[hook] = build
        return build

    def _load(self, hook: str):
        bcc = _import_bcc()
        if hook not in self.builds:
            if not self.pin_dir:
                raise ConfigError("a second hook shares the maps only through pins: give "
                                  "the data path a pin directory")
            self._compile(hook)
        import ctypes
        prog_type = bcc.BPF.SCHED_CLS if hook == "tc" else bcc.BPF.XDP
        build = self.builds[hook]
        fns = [build.load_func(name, prog_type) for name in PROGRAMS[hook]]
        progs = build[b"progs"]
        for i, fn in enumerate(fns):
            progs[ctypes.c_int(PROG_SLOTS[i])] = ctypes.c_int(fn.fd)
        self.fns[hook] = fns[0]
        if self.pin_dir and hook == self.hook:
            self._pin_installer(build, prog_type)
        return fns[0]

    def _pin_installer(self, build, prog_type) -> None:
        """Pin the record installer (bpf/install.h) of the first hook next to the maps, so a
        fleet agent that did not load the data path runs it by BPF_PROG_TEST_RUN without
        compiling (a restarted agent is up in a second). Replaces the pin of an older
        program, of either hook."""
        from hyperplane.datapath.pinned import pin_program
        self.install_fn = build.load_func(INSTALL_PROGRAM[self.hook], prog_type)
        for hook, name in INSTALLER_PINS.items():
            if hook != self.hook:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.pin_dir, name))
        pin_program(self.install_fn.fd, os.path.join(self.pin_dir, INSTALLER_PINS[self.hook]))

    PINNED = pinned_map_names()  # every HP_MAP of bpf/maps.h

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

    def install_fd(self) -> int:
        """The record installer (bpf/install.h) of this data path's first hook, loaded on
        first use."""
        if self.install_fn is None:
            bcc = _import_bcc()
            prog_type = bcc.BPF.SCHED_CLS if self.hook == "tc" else bcc.BPF.XDP
            self.install_fn = self.builds[self.hook].load_func(INSTALL_PROGRAM[self.hook],
                                                               prog_type)
        return self.install_fn.fd

    def table(self, name: str):
        return self.bpf[name.encode()]

    def attach(self, ifname: str, mode: str = "auto") -> str:
        """Attach to ifname (in the calling thread's namespace); returns the hook used.
        Replaces whatever hyperplane program was attached there before."""
        hook = choose_hook(ifname, mode)
        fn = self.fns.get(hook) or self._load(hook)
        accept_translated(ifname)
        detach(ifname)
        try:
            if hook == "xdp":
                self.builds[hook].attach_xdp(ifname.encode(), fn, XDP_MODES["native"])
            else:
                _tc_attach(ifname, fn.fd, PROGRAMS["tc"][0].decode())
        except Exception as exc:
            if mode == "auto" and hook == "xdp":  # no native XDP after all: tc
                return self.attach(ifname, "tc")
            raise ConfigError(f"cannot attach the data path ({hook}) to {ifname}: "
                              f"{exc}") from exc
        self.attached.append((ifname, hook))
        return hook

    def detach_all(self) -> None:
        while self.attached:
            ifname, _hook = self.attached.pop()
            detach(ifname)

    def close(self) -> None:
        self.detach_all()
        for build in self.builds.values():
            build.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def accept_translated(ifname: str) -> None:
    """Let the kernel take the translated packets the data path hands it on ifname (calling
    thread's namespace): at XDP those whose next hop is not resolved yet (PASS_NEIGH: the
    kernel ARPs and forwards them), at both hooks those too big without DF
    (PASS_FRAGMENTING). Toward the outside their source is a NAT IP or VIP, an address of
    this node, so the kernel drops them as a martian source unless ifname has
    accept_local=1, and then the next hop is never resolved: native XDP on the Vagrant
    lab's virtio NICs got no NAT traffic through (dmesg: "martian source"). Strict
    rp_filter drops them even so, loose does not; the kernel applies the larger of
    conf/all and the interface's value, so a strict one (1) becomes loose (2) on ifname."""
    conf = f"/proc/sys/net/ipv4/conf/{ifname}"
    try:
        with open(f"{conf}/accept_local", "w") as f:
            f.write("1")
        rp = []
        for c in (conf, "/proc/sys/net/ipv4/conf/all"):
            with open(f"{c}/rp_filter") as f:
                rp.append(int(f.read().strip() or 0))
        if max(rp) == 1:
            with open(f"{conf}/rp_filter", "w") as f:
                f.write("2")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot make {ifname} accept the translated packets the data path "
                          f"hands the kernel ({conf}: accept_local=1, rp_filter not 1): "
                          f"{exc}") from exc


def _tc_attach(ifname: str, prog_fd: int, name: str) -> None:
    """A direct-action bpf filter on ifname's clsact ingress hook (pyroute2)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            raise ConfigError(f"no interface {ifname}")
        try:
            ipr.tc("add", "clsact", index[0])
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.tc("add-filter", "bpf", index[0], ":1", fd=prog_fd, name=name,
               parent=TC_INGRESS, prio=TC_PRIORITY, classid=1, direct_action=True)


def detach(ifname: str) -> None:
    """Remove the data path from ifname (calling thread's namespace), whichever hook and
    mode it was attached with; nothing attached, or no such interface, is fine."""
    import contextlib
    bcc = _import_bcc()
    for flags in XDP_MODES.values():
        with contextlib.suppress(Exception):
            bcc.BPF.remove_xdp(ifname.encode(), flags)
    with contextlib.suppress(Exception):
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=ifname)
            if index:
                ipr.tc("del-filter", "bpf", index[0], ":1", parent=TC_INGRESS,
                       prio=TC_PRIORITY)


PERCPU_TYPES = (5, 6)  # BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY


def map_info(fd: int):
    """struct bpf_map_info of a map fd (libbpf's bpf_obj_get_info_by_fd)."""
    import ctypes

    class MapInfo(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                    ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                    ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                    ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 64)]

    from hyperplane.datapath.testrun import _libbpf
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
