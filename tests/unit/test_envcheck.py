"""hyperplane.envcheck: one clear sentence per environment problem, never a traceback."""
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hyperplane import envcheck
from hyperplane.errors import EnvironmentProblem

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "scripts" / "setup.sh", ROOT / "scripts" / "demo", ROOT / "scripts" / "test",
           ROOT / ".ci" / "run"]


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def public_dir():
    """A temp dir the nobody user can read (a CI clone may sit in a private folder)."""
    d = Path(tempfile.mkdtemp(prefix="hp-envcheck-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def assert_one_sentence(msg):
    assert isinstance(msg, str) and msg, msg
    assert "\n" not in msg, f"more than one line: {msg!r}"
    assert msg.endswith("."), f"not a full sentence: {msg!r}"
    assert ". " not in msg, f"more than one sentence: {msg!r}"
    assert "Traceback" not in msg


# ---- each check, made to fail ------------------------------------------------------------

def test_check_root_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    msg = envcheck.check_root()
    assert_one_sentence(msg)
    assert "root" in msg and "sudo" in msg


def test_check_root_is_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert envcheck.check_root() is None


@pytest.mark.parametrize("code, euid, words", [
    (errno.ENOSYS, 0, ["bpf()", "CONFIG_BPF_SYSCALL"]),
    (errno.EPERM, 1000, ["bpf()", "root"]),
    (errno.EPERM, 0, ["bpf()", "forbids BPF"]),
    (errno.EINVAL, 0, ["BPF map"]),
])
def test_check_bpf_syscall_refused(monkeypatch, code, euid, words):
    def refuse():
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(envcheck, "_bpf_map_create_tiny", refuse)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    msg = envcheck.check_bpf_syscall()
    assert_one_sentence(msg)
    for word in words:
        assert word in msg
    assert errno.errorcode[code] in msg


def test_check_kernel_headers_missing(tmp_path):
    msg = envcheck.check_kernel_headers(release="9.9.9-nope", modules_dir=str(tmp_path))
    assert_one_sentence(msg)
    assert str(tmp_path / "9.9.9-nope" / "build") in msg
    assert "linux-headers-amd64" in msg and "scripts/setup.sh" in msg


def test_check_kernel_headers_incomplete(tmp_path):
    (tmp_path / "9.9.9" / "build").mkdir(parents=True)
    msg = envcheck.check_kernel_headers(release="9.9.9", modules_dir=str(tmp_path))
    assert_one_sentence(msg)
    assert "incomplete" in msg


def test_check_kernel_headers_present(tmp_path):
    build = tmp_path / "9.9.9" / "build"
    build.mkdir(parents=True)
    (build / "Makefile").write_text("")
    assert envcheck.check_kernel_headers(release="9.9.9", modules_dir=str(tmp_path)) is None


def test_check_bcc_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` raise ImportError
    msg = envcheck.check_bcc()
    assert_one_sentence(msg)
    assert "python3-bpfcc" in msg and "--system-site-packages" in msg


def _mountinfo(tmp_path, lines):
    f = tmp_path / "mountinfo"
    f.write_text("".join(line + "\n" for line in lines))
    return str(f)


def test_check_bpffs_not_mounted(tmp_path, monkeypatch):
    monkeypatch.setattr(envcheck, "MOUNTINFO", _mountinfo(tmp_path, [
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw",
    ]))
    msg = envcheck.check_bpffs("/run/hyperplane/bpf")
    assert_one_sentence(msg)
    assert "mount -t bpf bpf /run/hyperplane/bpf" in msg


def test_check_bpffs_wrong_fs_and_topmost_mount_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(envcheck, "MOUNTINFO", _mountinfo(tmp_path, [
        "30 22 0:40 / /run/hyperplane/bpf rw,relatime shared:9 - bpf bpf rw",
        "31 30 0:41 / /run/hyperplane/bpf rw,relatime shared:10 - tmpfs tmp rw",
    ]))
    msg = envcheck.check_bpffs("/run/hyperplane/bpf")
    assert_one_sentence(msg)
    assert "tmpfs" in msg


def test_check_bpffs_mounted_with_escaped_path(tmp_path, monkeypatch):
    monkeypatch.setattr(envcheck, "MOUNTINFO", _mountinfo(tmp_path, [
        r"30 22 0:40 / /run/my\040pins rw,relatime shared:9 - bpf bpf rw",
    ]))
    assert envcheck.check_bpffs("/run/my pins") is None


# ---- problems(), require(), the -m entry ---------------------------------------------------

def test_problems_skips_bpf_probe_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    called = []
    monkeypatch.setattr(envcheck, "check_bpf_syscall", lambda: called.append(1) or "x.")
    monkeypatch.setattr(envcheck, "CHECKS", (envcheck.check_root, envcheck.check_bpf_syscall))
    found = envcheck.problems()
    assert len(found) == 1 and "root" in found[0]
    assert not called


def test_require_raises_first_problem(monkeypatch):
    monkeypatch.setattr(envcheck, "problems", lambda: ["First thing is wrong.", "Second."])
    with pytest.raises(EnvironmentProblem) as info:
        envcheck.require()
    assert str(info.value) == "First thing is wrong."
    assert info.value.exit_status == 3


def test_require_passes_when_no_problem(monkeypatch):
    monkeypatch.setattr(envcheck, "problems", lambda: [])
    assert envcheck.require() is None


def test_this_machine_has_no_problem():
    """After scripts/setup.sh (which scripts/test runs first) nothing may be missing."""
    found = envcheck.problems()
    assert found == [], "environment problems on this machine:\n" + "\n".join(found)


def test_real_bpf_probe_and_headers_and_bcc_each_pass():
    # The same as above, one check at a time, so a failure names the check.
    for check in envcheck.CHECKS:
        assert check() is None, f"{check.__name__}: {check()}"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop to an unprivileged user")
def test_module_entry_as_nobody_says_one_sentence_and_exits_3(public_dir):
    pkg = public_dir / "hyperplane"
    pkg.mkdir()
    for name in ("__init__.py", "errors.py", "envcheck.py"):
        shutil.copy(ROOT / "hyperplane" / name, pkg / name)
    for p in (pkg, *pkg.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    # The real interpreter (the venv may sit where nobody cannot enter); bcc is system-wide.
    python = os.path.realpath(sys.executable)
    proc = subprocess.run(
        [*NOBODY, python, "-B", "-m", "hyperplane.envcheck"],
        cwd=public_dir, env={**os.environ, "PYTHONPATH": str(public_dir)},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 3, proc
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr  # the root problem only, not a second EPERM one
    assert lines[0].startswith("hyperplane: ") and "root" in lines[0]
    assert_one_sentence(lines[0].removeprefix("hyperplane: "))


def test_module_entry_exits_0_here():
    proc = subprocess.run([sys.executable, "-m", "hyperplane.envcheck"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")


# ---- the scripts that use it -----------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_is_valid_strict_bash(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "/work/main" not in text, "scripts must work from any clone"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_setup_refuses_non_root_with_one_sentence(public_dir):
    if os.geteuid() == 0:
        (public_dir / "scripts").mkdir(mode=0o755)
        setup = public_dir / "scripts" / "setup.sh"
        shutil.copy(SCRIPTS[0], setup)
        setup.chmod(0o755)
        cmd = [*NOBODY, "bash", str(setup)]
    else:
        cmd = ["bash", str(SCRIPTS[0])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "as root" in proc.stderr, proc.stderr


def test_test_script_runs_exactly_the_readme_command():
    text = (ROOT / "scripts" / "test").read_text()
    # every test, in two phases: the shared ones two at a time, then the exclusive ones
    assert 'HP_TEST_PHASE=shared .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"' \
        in text
    assert 'HP_TEST_PHASE=exclusive .venv/bin/python -m pytest -q tests "$@"' in text
    assert "scripts/test" in (ROOT / "README.md").read_text()


def _collect(phase: str, *paths: str) -> subprocess.CompletedProcess:
    """pytest --collect-only of paths with HP_TEST_PHASE=phase."""
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", *paths], cwd=ROOT,
                          env={**os.environ, "HP_TEST_PHASE": phase}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("phase, want", [("shared", {"unit"}), ("exclusive", {"lab"}),
                                         ("", {"unit", "lab"})])
def test_each_phase_of_scripts_test_collects_its_own_tests(phase, want):
    """HP_TEST_PHASE (tests/conftest.py): the two phases of scripts/test split the tests
    between them, every test in exactly one."""
    proc = _collect(phase, "tests/unit/test_cli_lazy.py", "tests/lab/test_nftlb_lab.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert {i.split("/")[1] for i in ids} == want, ids


def test_an_unknown_test_phase_is_a_usage_error():
    proc = _collect("both", "tests/unit/test_cli_lazy.py")
    assert proc.returncode == 4 and "HP_TEST_PHASE must be shared or exclusive" in \
        proc.stdout + proc.stderr, proc.stdout + proc.stderr
