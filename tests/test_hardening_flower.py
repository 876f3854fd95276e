"""Over Flower, a SuperNode that claims another node's partition-id is left out and the run goes on."""

from __future__ import annotations

import types

from fedtune.runtime.flower import FlowerGrid, FlowerSettings
from fedtune.wire import Message


def test_a_node_claiming_another_nodes_partition_id_is_left_out():
    grid = object.__new__(FlowerGrid)
    grid.grid = types.SimpleNamespace(get_node_ids=lambda: [11, 12, 13])
    grid.settings = FlowerSettings()
    grid.num_clients = 3
    claims = {11: 0, 12: 0, 13: 2}  # node 12 claims node 11's partition
    grid._exchange = lambda pairs, timeout: [Message({}, {"partition_id": claims[n]}) for n, _ in pairs]
    assert grid._discover() == {0: 11, 2: 13}
