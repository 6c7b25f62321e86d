"""Where a NAT IP / VIP address goes, and that only addresses hyperplane added (recorded,
and labelled while the label fits) are ever removed."""
import pytest

from hyperplane.node.addresses import Added, label, plan
from hyperplane.errors import ConfigError

LINKS = ["lo", "in0", "out0", "averyverylongif"]


def present(*entries):
    """(ip, prefixlen, ifname[, label])"""
    return [{"address": e[0], "prefixlen": e[1], "ifname": e[2],
             "label": e[3] if len(e) > 3 else e[2]} for e in entries]


NODE = present(("10.10.0.1", 24, "in0"), ("198.18.0.1", 24, "out0"))


def test_an_address_goes_on_the_interface_whose_network_holds_it():
    p = plan(["198.18.0.100", "10.10.0.200"], [], NODE, [], LINKS)
    assert p.add == [Added("198.18.0.100", "out0"), Added("10.10.0.200", "in0")]
    more = NODE + present(("198.18.0.129", 25, "in0"))          # the longest prefix wins
    assert plan(["198.18.0.200"], [], more, [], LINKS).add == [Added("198.18.0.200", "in0")]


def test_else_on_the_default_routes_interface_else_the_named_one_else_an_error():
    assert plan(["203.0.113.5"], [], NODE, ["out0"], LINKS).add == \
        [Added("203.0.113.5", "out0")]
    assert plan(["203.0.113.5"], [], NODE, [], LINKS, outside_if="in0").add == \
        [Added("203.0.113.5", "in0")]
    with pytest.raises(ConfigError, match="Cannot tell which interface NAT IP 203.0.113.5 "
                                          "belongs on.*--outside-if"):
        plan(["203.0.113.5"], [], NODE, [], LINKS, what="NAT IP", hint="; use --outside-if")
    with pytest.raises(ConfigError, match="no interface 'eth9'"):
        plan(["203.0.113.5"], [], NODE, [], LINKS, outside_if="eth9")


def test_an_address_already_there_is_left_alone_and_never_becomes_ours():
    users = NODE + present(("198.18.0.100", 32, "out0"))
    p = plan(["198.18.0.100"], [], users, [], LINKS)
    assert p.add == p.keep == p.remove == []
    # not wanted any more, and not ours: still not removed
    assert plan([], [], users, [], LINKS).remove == []


def test_ours_are_kept_while_wanted_and_removed_when_not():
    ours = NODE + present(("198.18.0.100", 32, "out0", "out0:hp"))
    owned = [Added("198.18.0.100", "out0")]
    assert plan(["198.18.0.100"], owned, ours, [], LINKS).keep == owned
    assert plan([], owned, ours, [], LINKS).remove == owned


def test_a_recorded_address_that_lost_its_label_is_not_ours_any_more():
    # someone removed ours and added their own 198.18.0.100/32 (no label)
    theirs = NODE + present(("198.18.0.100", 32, "out0"))
    p = plan([], [Added("198.18.0.100", "out0")], theirs, [], LINKS)
    assert p.remove == [] and p.owned == []


def test_a_recorded_address_that_is_gone_is_added_again():
    p = plan(["198.18.0.100"], [Added("198.18.0.100", "out0")], NODE, [], LINKS)
    assert p.add == [Added("198.18.0.100", "out0")] and p.keep == []


def test_labels_that_do_not_fit_ifnamsiz_are_left_out_and_the_record_decides():
    assert label("out0") == "out0:hp"
    assert label("averyverylongif") is None            # 15 + 3 characters do not fit
    long_if = present(("198.18.0.1", 24, "averyverylongif"),
                      ("198.18.0.100", 32, "averyverylongif"))
    owned = [Added("198.18.0.100", "averyverylongif")]
    assert plan([], owned, long_if, [], LINKS).remove == owned
    assert plan([], [], long_if, [], LINKS).remove == []


def test_a_damaged_record_owns_nothing():
    assert Added.from_dicts("garbage") == []
    assert Added.from_dicts([{"ip": 1}, {"ip": "198.18.0.100", "ifname": "out0"}, 7]) == \
        [Added("198.18.0.100", "out0")]
