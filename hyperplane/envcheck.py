"""Does this machine have what hyperplane needs?

Each ``check_*`` function returns ``None`` when all is well, or ONE sentence that says
what is wrong and how to fix it (no traceback: these are environment problems, not bugs).

    problems()  -> list of those sentences, in a useful order (root first)
    require()   -> raises hyperplane.errors.EnvironmentProblem(first problem)

``python -m hyperplane.envcheck`` prints every problem on stderr and exits 3 (the
EnvironmentProblem exit status) if there is any; scripts/setup.sh runs it last.
"""
from __future__ import annotations

import ctypes
import errno
import importlib
import os
import platform
import sys

from hyperplane.errors import EnvironmentProblem

BPFFS_PATH = "/run/hyperplane/bpf"
MODULES_DIR = "/lib/modules"
MOUNTINFO = "/proc/self/mountinfo"

# bpf(2) syscall numbers per architecture.
_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2

_SETUP = "scripts/setup.sh"


def check_root() -> str | None:
    if os.geteuid() != 0:
        return ("root is needed to load XDP programs, pin BPF maps and build network "
                "namespaces: run the command again as root, with sudo.")
    return None


class _BpfAttrMapCreate(ctypes.Structure):
    # The head of union bpf_attr for BPF_MAP_CREATE; the kernel zero-fills the rest.
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    ]


def _bpf_map_create_tiny() -> None:
    """Create (and close) a one-entry BPF array; raise OSError on failure."""
    machine = platform.machine()
    nr = _BPF_SYSCALL_NR.get(machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"no known bpf() syscall number for {machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = _BpfAttrMapCreate(_BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(_BPF_MAP_CREATE),
                      ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(fd)


def check_bpf_syscall() -> str | None:
    try:
        _bpf_map_create_tiny()
    except OSError as exc:
        code = exc.errno
        name = errno.errorcode.get(code, str(code))
        if code == errno.ENOSYS:
            return (f"the kernel refused the bpf() syscall ({name}: {exc.strerror}): "
                    "run on a Linux kernel built with CONFIG_BPF_SYSCALL on x86_64, "
                    "outside any sandbox that filters bpf().")
        if code in (errno.EPERM, errno.EACCES):
            if os.geteuid() != 0:
                return (f"the bpf() syscall was refused ({name}) because this is not root: "
                        "run the command again as root, with sudo.")
            return (f"the bpf() syscall was refused even to root ({name}): this machine or "
                    "container forbids BPF (seccomp, missing CAP_BPF/CAP_SYS_ADMIN or kernel "
                    "lockdown), so run hyperplane on a VM or host that allows it.")
        return (f"creating a one-entry BPF map failed ({name}: {exc.strerror}): check that "
                "the kernel supports BPF maps and that the memlock limit is not tiny "
                "(ulimit -l).")
    return None


def check_kernel_headers(release: str | None = None, modules_dir: str = MODULES_DIR) -> str | None:
    release = release or platform.release()
    build = os.path.join(modules_dir, release, "build")
    if not os.path.isdir(build):
        return (f"bcc needs kernel headers at {build}, which does not exist: run "
                f"{_SETUP} as root (it installs linux-headers-amd64 and links them there).")
    if not os.path.exists(os.path.join(build, "Makefile")):
        return (f"the kernel headers at {build} are incomplete (no Makefile): reinstall "
                f"linux-headers-amd64 and run {_SETUP} as root.")
    return None


def check_bcc() -> str | None:
    try:
        importlib.import_module("bcc")
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return (f"Python ({sys.executable}) cannot import bcc ({reason}): install Debian's "
                "python3-bpfcc and use a venv made from /usr/bin/python3 with "
                f"--system-site-packages, which {_SETUP} does.")
    return None


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and all(c in "01234567" for c in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _fstype_at(path: str) -> str | None:
    """The filesystem type mounted exactly at path (the topmost mount), or None."""
    fstype = None
    with open(MOUNTINFO, encoding="utf-8", errors="replace") as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields = left.split()
            if len(fields) < 5:
                continue
            if _unescape_mountinfo(fields[4]) == path:
                fstype = right.split()[0] if right.split() else None
    return fstype


def check_bpffs(path: str = BPFFS_PATH) -> str | None:
    real = os.path.realpath(path)
    fix = f"run {_SETUP} as root (or: mkdir -p {path} && mount -t bpf bpf {path})."
    try:
        fstype = _fstype_at(real)
    except OSError as exc:
        return f"cannot read {MOUNTINFO} to find the bpffs at {path} ({exc.strerror}): {fix}"
    if fstype is None:
        return f"no bpffs is mounted at {path}, where hyperplane pins its BPF maps: {fix}"
    if fstype != "bpf":
        return f"{path} is a {fstype} mount, not a bpffs, so BPF maps cannot be pinned there: {fix}"
    return None


CHECKS = (check_root, check_bpf_syscall, check_kernel_headers, check_bcc, check_bpffs)


def problems() -> list[str]:
    """Every environment problem found, as one sentence each (empty: all is well).

    When root is missing, the bpf() probe is skipped: it would only fail with EPERM and
    repeat the same cause in a second sentence.
    """
    found = []
    for check in CHECKS:
        if check is check_bpf_syscall and found and os.geteuid() != 0:
            continue
        msg = check()
        if msg:
            found.append(msg)
    return found


def require() -> None:
    """Raise EnvironmentProblem with the first problem, if any."""
    found = problems()
    if found:
        raise EnvironmentProblem(found[0])


def main(argv: list[str] | None = None) -> int:
    found = problems()
    for msg in found:
        print(f"hyperplane: {msg}", file=sys.stderr)
    return EnvironmentProblem.exit_status if found else 0


if __name__ == "__main__":
    sys.exit(main())
