"""The local Azurite starter: parallel test workers each start one, so its ports must be
distinct and a port another process took first must not stop it (a CI run failed that way)."""

from __future__ import annotations

import socket

from localdev.azurite import Azurite, free_ports


def test_ports_chosen_together_are_distinct() -> None:
    # Many at once, so that a chooser that closes each socket before the next bind repeats one
    # (1,000 binds one after another repeated 40 ports here); Azurite takes 3.
    ports = free_ports(1000)
    assert len(set(ports)) == len(ports)


def test_a_port_taken_before_azurite_binds_it_is_replaced() -> None:
    azurite = Azurite()
    taken = azurite.ports["queue"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with azurite:
            assert azurite.ports["queue"] != taken
            assert len(set(azurite.ports.values())) == 3
            assert azurite._process is not None and azurite._process.poll() is None
