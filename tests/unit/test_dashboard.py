"""The dashboard's render() is a pure function of a snapshot."""
from rich.console import Console

from hyperplane.observe.dashboard import Snapshot, render


def _text(snapshot) -> str:
    console = Console(width=160, record=True)
    console.print(render(snapshot))
    return console.export_text()


def test_render_shows_rates_metrics_targets_and_flows():
    s = Snapshot(
        node="node1", taken=0.0,
        verdicts={"TX_NAT_OUT": 1200, "TX_NAT_IN": 800, "DROP_NO_FLOW": 0},
        rates={"TX_NAT_OUT": 300.0, "TX_NAT_IN": 200.0},
        gateways={"nat-gw-1": {"ErrorPortAllocation": 2, "ActiveConnectionCount": 5}},
        load_balancers={"0": {"NewFlowCount": 9, "HealthyHostCount": 2}},
        targets={"web": {"10.20.1.10:8080": {"state": "unhealthy", "active_flows": 1,
                                             "packets": 4242}}},
        top_flows=[{"kind": "NAT_OUT", "proto": "tcp", "src": "10.10.0.10", "sport": 40000,
                    "dst": "198.18.0.2", "dport": 80, "new_src": "198.18.0.100",
                    "new_sport": 31101, "new_dst": "198.18.0.2", "new_dport": 80,
                    "tcp_state": "ESTABLISHED", "bytes": 123456}])
    text = _text(s)
    assert "node node1: 2,000 packets" in text
    assert "TX_NAT_OUT" in text and "300" in text
    assert "DROP_NO_FLOW" not in text  # zero counters are hidden
    assert "ErrorPortAllocation" in text and "HealthyHostCount" in text
    assert "unhealthy" in text and "4,242" in text
    assert "10.10.0.10:40000 > 198.18.0.2:80" in text and "123,456" in text


def test_render_without_rates_or_agent():
    text = _text(Snapshot(node="n", taken=0.0, verdicts={"PASS_NON_IP": 3}, rates={}))
    assert "PASS_NON_IP" in text and "targets" not in text
