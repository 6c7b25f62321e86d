"""hpctl nat: malformed config and damaged state files are one sentence on stderr and exit
2, never a traceback; everything is checked before anything is loaded; `nat down` of a
node that does not exist says so (exit 4).

Nothing here loads a program: hyperplane.node.lifecycle.Datapath is replaced by one that fails the
test, so a check that came too late (after compiling) shows as a failure, not as a
program attached to this machine's interfaces."""
import json

import pytest

from hpctl.main import main
from hyperplane.node import lifecycle as node_mod

GW = {"name": "gw", "nat_ips": ["198.18.0.100"], "inside_cidrs": ["10.10.0.0/24"]}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(node_mod, "NODE_STATE_DIR", str(tmp_path / "nodes"))

    def loaded(*args, **kwargs):
        pytest.fail("nat up got as far as loading the program")
    monkeypatch.setattr(node_mod, "Datapath", loaded)


def hpctl(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return exc.value.code, out.out, out.err


def up_with(capsys, tmp_path, config, *flags):
    path = tmp_path / "gw.json"
    path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    return hpctl(capsys, "nat", "up", "--node", "n1", "--no-agent", "--config", str(path),
                 *flags)


def one_sentence(err: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("hpctl: ")


@pytest.mark.parametrize("config, words", [
    ([], "must be a table of fields"),
    ({"ifnames": ["lo"], "gateways": {"gw": GW}}, "gateways must be a list"),
    ({"ifnames": ["lo"], "gateways": [["gw"]]}, "a gateway must be a table of fields"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "port_min": "1024"}]}, "port_min must be an integer"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "port_min": 1024.5}]}, "port_min must be an integer"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "nat_ips": 5}]}, "nat_ips must be a list of strings"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "nat_ips": [3323068516]}]}, "list of strings"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "nat_ips": ["0.0.0.0"]}]}, "unicast"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "nat_ips": ["255.255.255.255"]}]}, "unicast"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "inside_cidrs": [10]}]}, "inside_cidrs must be"),
    ({"ifnames": ["lo"], "gateways": [{**GW, "name": 5}]}, "name must be a non-empty string"),
    ({"ifnames": ["lo"], "timeouts": [1], "gateways": [GW]}, "timeouts must be a table"),
    ({"ifnames": "lo", "gateways": [GW]}, "ifnames must be a list of strings"),
    ({"ifnames": ["lo"], "gateways": [GW], "colour": "red"}, "no field 'colour'"),
    ({"ifnames": ["lo"], "gateways": [GW, {**GW, "nat_ips": ["198.18.0.101"],
                                           "inside_cidrs": ["10.10.0.0/16"]}]},
     "Two gateways are named 'gw'"),
    ({"ifnames": ["lo"], "gateways": [GW, {**GW, "name": "gw2",
                                           "inside_cidrs": ["10.11.0.0/16"]}]},
     "NAT IP 198.18.0.100 belongs to both"),
    ({"ifnames": ["lo"], "gateways": [GW, {**GW, "name": "gw2", "nat_ips": ["198.18.0.101"],
                                           "inside_cidrs": ["10.10.0.128/25"]}]}, "overlap"),
    ({"ifnames": ["lo", "hpt-no-such-if0"], "gateways": [GW]}, "no interface 'hpt-no-such-if0'"),
    (b'{"ifnames": ["lo"], "gatew', "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    (b"", "is not valid JSON"),
])
def test_bad_config_is_one_sentence_and_exit_2_before_anything_loads(capsys, tmp_path,
                                                                     config, words):
    code, _, err = up_with(capsys, tmp_path, config)
    assert code == 2 and words in err and one_sentence(err), err


def test_bad_flags_are_refused_before_anything_loads(capsys):
    for flags, words in ((["--nat-ip", "1"], "NAT IP must be an IPv4 address"),
                         (["--nat-ip", "198.18.0.100"], "inside_cidrs must list at least 1"),
                         (["--nat-ip", "198.18.0.100", "--inside", "10.0.0.0/8", "--ports",
                           "1024-99999"], "port_max must be an integer from 1 to 65535"),
                         (["--nat-ip", "198.18.0.100", "--inside", "10.0.0.0/8", "--node",
                           "../etc"], "A node name must be"),
                         (["--nat-ip", "198.18.0.100", "--inside", "10.0.0.0/8", "--mode",
                           "bogus"], "mode must be one of")):
        code, _, err = hpctl(capsys, "nat", "up", "--node", "n1", "--if", "lo", "--no-agent",
                             *flags)
        assert code == 2 and words in err and one_sentence(err), err


def test_gateways_from_both_config_and_flags_are_refused(capsys, tmp_path):
    code, _, err = up_with(capsys, tmp_path, {"ifnames": ["lo"], "gateways": [GW]},
                           "--nat-ip", "198.18.0.101")
    assert code == 2 and "not both" in err


@pytest.mark.parametrize("content", [b'{"node": "n1", "netns"', b"\xff\xfe\x00", b"", b"[]",
                                     b'{"node": "n1"}',
                                     b'{"node": "n1", "netns": null, "ifnames": ["in0"], '
                                     b'"mode": "generic", "pin_dir": "/x", "sizes": {"max_x": 1},'
                                     b' "timeouts": {}, "gateways": []}'])
def test_a_damaged_state_file_is_one_sentence_and_exit_2(capsys, tmp_path, content):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "n1.json").write_bytes(content)
    code, _, err = hpctl(capsys, "nat", "show", "--node", "n1")
    assert code == 2 and "state file of node 'n1' is damaged" in err and one_sentence(err), err
    code, _, err = hpctl(capsys, "nat", "up", "--node", "n1", "--if", "lo", "--no-agent",
                         "--nat-ip", "198.18.0.100", "--inside", "10.0.0.0/8")
    assert code == 2 and "is damaged" in err, err


def test_nat_down_of_a_node_that_does_not_exist_says_so(capsys):
    code, _, err = hpctl(capsys, "nat", "down", "--node", "hpt-no-such-node")
    assert code == 4 and "no node 'hpt-no-such-node' here" in err and one_sentence(err)


@pytest.mark.parametrize("args", [("nat", "show", "--node", "../etc/x"),
                                  ("nat", "down", "--node", "../etc/x"),
                                  ("lb", "health", "--node", "a/b")])
def test_a_node_name_that_is_a_path_is_refused(capsys, args):
    code, _, err = hpctl(capsys, *args)
    assert code == 2 and "A node name must be" in err and one_sentence(err), err
