"""Round robin: spread, exact weights, health, and continuity when the endpoint set changes."""

import subprocess
import sys
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from mesh.balancer import RoundRobin, make_balancer
from mesh.config import BalancerSettings
from mesh.discovery import Endpoint


def endpoints(*weights: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.0.0.{i + 1}", 15001, weight=weight) for i, weight in enumerate(weights))


def picks(balancer: RoundRobin, endpoint_set: tuple[Endpoint, ...], count: int) -> list[str]:
    chosen = [balancer.pick(endpoint_set) for _ in range(count)]
    return [endpoint.host if endpoint else "none" for endpoint in chosen]


def test_equal_weights_rotate_in_order() -> None:
    assert picks(RoundRobin(), endpoints(1, 1, 1), 7) == [
        "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1",
    ]  # fmt: skip


def test_weights_three_to_one_give_three_to_one_each_cycle_interleaved() -> None:
    chosen = picks(RoundRobin(), endpoints(3, 1), 8)
    assert Counter(chosen[:4]) == Counter(chosen[4:]) == {"10.0.0.1": 3, "10.0.0.2": 1}
    assert chosen[:4] == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1"]  # nginx's smooth order


def test_unhealthy_and_zero_weight_endpoints_are_skipped() -> None:
    a, b, c = endpoints(1, 1, 1)
    endpoint_set = (a, Endpoint(b.host, b.port, healthy=False), Endpoint(c.host, c.port, weight=0))
    assert set(picks(RoundRobin(), endpoint_set, 6)) == {"10.0.0.1"}


def test_nothing_usable_gives_none() -> None:
    balancer = RoundRobin()
    assert balancer.pick(()) is None
    assert balancer.pick((Endpoint("10.0.0.1", 1, healthy=False),)) is None


def test_added_endpoint_joins_the_rotation_where_it_stands() -> None:
    balancer = RoundRobin()
    three = endpoints(1, 1, 1)
    assert picks(balancer, three, 2) == ["10.0.0.1", "10.0.0.2"]
    four = (*three, Endpoint("10.0.0.4", 15001))
    assert picks(balancer, four, 3) == ["10.0.0.3", "10.0.0.4", "10.0.0.1"]


def test_removed_endpoint_is_never_picked_again_and_the_rotation_goes_on() -> None:
    balancer = RoundRobin()
    a, b, c, d = endpoints(1, 1, 1, 1)
    assert picks(balancer, (a, b, c, d), 2) == ["10.0.0.1", "10.0.0.2"]
    assert picks(balancer, (a, c, d), 4) == ["10.0.0.3", "10.0.0.4", "10.0.0.1", "10.0.0.3"]
    assert picks(balancer, (a, d), 2) == ["10.0.0.4", "10.0.0.1"]  # the last pick left: its successor


def test_weighted_state_carries_over_a_set_change() -> None:
    balancer = RoundRobin()
    a, b = endpoints(3, 1)
    picks(balancer, (a, b), 3)  # a, a, b
    c = Endpoint("10.0.0.3", 15001, weight=1)
    chosen = picks(balancer, (a, b, c), 50)
    assert "10.0.0.3" in chosen[:5]
    counts = Counter(chosen)
    assert abs(counts["10.0.0.1"] - 30) <= 2 and abs(counts["10.0.0.2"] - 10) <= 2


def test_a_changed_weight_is_honoured() -> None:
    balancer = RoundRobin()
    picks(balancer, endpoints(1, 1), 3)
    assert Counter(picks(balancer, endpoints(1, 4), 5)) == {"10.0.0.1": 1, "10.0.0.2": 4}


def test_same_set_object_is_read_once_but_a_new_equal_set_also_works() -> None:
    balancer = RoundRobin()
    assert picks(balancer, endpoints(1, 1), 1) == ["10.0.0.1"]
    assert picks(balancer, endpoints(1, 1), 1) == ["10.0.0.2"]  # a new tuple, same endpoints


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=12))
def test_each_cycle_of_sum_weights_picks_matches_the_weights_exactly(weights: list[int]) -> None:
    balancer = RoundRobin()
    endpoint_set = endpoints(*weights)
    expected = {f"10.0.0.{i + 1}": weight for i, weight in enumerate(weights)}
    for _ in range(2):
        assert Counter(picks(balancer, endpoint_set, sum(weights))) == expected


def test_make_balancer_builds_round_robin() -> None:
    assert isinstance(make_balancer(BalancerSettings(policy="round_robin")), RoundRobin)


def test_importing_the_balancer_loads_no_trio_even_through_endpoint_types() -> None:
    # test_architecture checks direct imports; Endpoint lives in trio-driven discovery, hence this check.
    code = "import sys, mesh.balancer; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
