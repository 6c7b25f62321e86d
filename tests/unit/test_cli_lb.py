"""hpctl lb edits the store, validated as a whole; bad input exits 2 with one sentence."""
import json

import pytest

from hpctl.main import main


def hpctl(capsys, store, *args):
    with pytest.raises(SystemExit) as exc:
        main(_with_store(args, store))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _with_store(args, store):
    # --store goes after the (sub)command words, before the arguments
    return [*args, "--store", store]


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store.json")


def test_build_a_load_balancer(capsys, store):
    assert hpctl(capsys, store, "lb", "create", "web-nlb")[0] == 0
    assert hpctl(capsys, store, "lb", "tg", "create", "web", "--interval", "5")[0] == 0
    assert hpctl(capsys, store, "lb", "listener", "add", "--lb", "web-nlb", "--vip",
                 "198.18.0.200", "--port", "80", "--tg", "web")[0] == 0
    assert hpctl(capsys, store, "lb", "register", "--tg", "web", "10.20.1.10:8080",
                 "10.20.2.10:8080@3")[0] == 0
    assert hpctl(capsys, store, "lb", "deregister", "--tg", "web", "10.20.1.10:8080")[0] == 0
    code, out, _ = hpctl(capsys, store, "lb", "show", "--json")
    assert code == 0
    cfg = json.loads(out)
    targets = {f"{t['ip']}:{t['port']}": t for t in cfg["target_groups"][0]["targets"]}
    assert targets["10.20.1.10:8080"]["state"] == "draining"
    assert targets["10.20.2.10:8080"]["weight"] == 3
    assert cfg["listeners"][0]["protocol"] == "TCP"


@pytest.mark.parametrize("args,message", [
    (("lb", "listener", "add", "--lb", "nope", "--vip", "198.18.0.200", "--port", "80",
      "--tg", "web"), "no load balancer 'nope'"),
    (("lb", "tg", "create", "web", "--interval", "1"), "interval"),
    (("lb", "register", "--tg", "missing", "10.0.0.1:80"), "no target group"),
])
def test_bad_changes_are_refused_and_change_nothing(capsys, store, args, message):
    hpctl(capsys, store, "lb", "create", "web-nlb")
    before = open(store).read()
    code, _, err = hpctl(capsys, store, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert open(store).read() == before
