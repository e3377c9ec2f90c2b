"""Static topology: parsing, round trip, and error messages that name the offending field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from jasper.topology import TopologyError, parse_topology

DOC: dict[str, Any] = {
    "version": 1,
    "plan_epoch": 3,
    "stream": {"id": 1, "name": "book", "hedge": 1, "hold_ns": 400000},
    "publisher": {"name": "pub", "addr": "127.0.0.1", "targets": ["r0.0"]},
    "relays": [
        {
            "name": "r0.0",
            "addr": "127.0.0.1",
            "port": 7000,
            "targets": [{"node": "r1.0"}, {"node": "r1.1"}],
        },
        {
            "name": "r1.0",
            "addr": "127.0.0.1",
            "port": 7001,
            "targets": [{"node": "e0"}, {"node": "e1", "hedge": True}],
        },
        {
            "name": "r1.1",
            "addr": "127.0.0.1",
            "port": 7002,
            "targets": [{"node": "e1"}, {"node": "e0", "hedge": True}],
        },
    ],
    "receivers": [
        {
            "name": "h0",
            "addr": "127.0.0.2",
            "endpoints": [
                {"name": "e0", "port": 7100, "parents": ["r1.0", "r1.1"]},
                {
                    "name": "e1",
                    "port": 7101,
                    "parents": ["r1.1", "r1.0"],
                    "deliver": "udp:127.0.0.1:9000",
                },
            ],
        }
    ],
    "link_model": None,
}


def test_parse_and_round_trip() -> None:
    topo = parse_topology(DOC)
    assert topo.plan_epoch == 3 and topo.stream.hedge == 1
    assert topo.relay("r1.0").targets[1].hedge is True
    assert topo.address_of("e1") == ("127.0.0.2", 7101)
    assert parse_topology(topo.to_dict()) == topo


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["stream", "id"], KeyError, r"\$\.stream\.id: required"),
        (["stream", "id"], "one", r"\$\.stream\.id: expected an integer"),
        (["stream", "hedge"], True, r"\$\.stream\.hedge: expected an integer, got a boolean"),
        (["relays", 1, "port"], 70000, r"\$\.relays\[1\]\.port: port 70000 out of range"),
        (["relays", 0, "addr"], "localhost", r"\$\.relays\[0\]\.addr: 'localhost' is not an IPv4"),
        (["relays", 0, "targets", 0, "node"], "r9.9", r"unknown relay or endpoint 'r9.9'"),
        (["receivers", 0, "endpoints", 1, "port"], 7100, r"address 127\.0\.0\.2:7100 already used"),
        (["relays", 2, "name"], "r1.0", r"\$\.relays\[2\]\.name: 'r1\.0' already used"),
        (["surprise"], 1, r"unknown field\(s\) surprise"),
        (["version"], 2, r"unsupported schema version 2"),
    ],
)
def test_errors_name_the_path(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(_broken(path, value))


def test_relay_may_not_forward_to_itself() -> None:
    doc = copy.deepcopy(DOC)
    doc["relays"][1]["targets"].append({"node": "r1.0"})
    with pytest.raises(TopologyError, match="forwards to itself"):
        parse_topology(doc)
