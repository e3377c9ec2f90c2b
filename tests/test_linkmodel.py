"""Link model: seeded determinism, configured percentiles, spikes, lemons, loss, validation."""

from __future__ import annotations

import numpy as np
import pytest

from jasper.linkmodel import LinkModel, LinkModelError, parse_link_model

N = 40_000


def draws(model: LinkModel, src: str = "a", dst: str = "b", n: int = N) -> list[int | None]:
    s = model.link(src, dst)
    return [s.sample() for _ in range(n)]


def test_same_seed_same_draws_and_links_independent() -> None:
    m = LinkModel(seed=3, spike_prob=0.01, loss=0.01)
    assert draws(m, n=500) == draws(m, n=500)
    assert draws(m, n=500) != draws(m, "a", "c", n=500)
    assert draws(m, n=500) != draws(LinkModel(seed=4, spike_prob=0.01, loss=0.01), n=500)


def test_body_percentiles_match_configuration() -> None:
    # Tolerance: with 40,000 draws the sample p50 is within ~1% and p99 within ~3% of the
    # true quantile (standard error of order statistics); we allow 3% and 6%.
    m = LinkModel(median_ns=40_000, p99_ns=120_000)
    a = np.array(draws(m), dtype=float)
    p50, p99 = np.percentile(a, [50, 99])
    assert p50 == pytest.approx(40_000, rel=0.03)
    assert p99 == pytest.approx(120_000, rel=0.06)
    assert m.quantile_ns(0.5) == pytest.approx(40_000, rel=1e-6)
    assert m.quantile_ns(0.99) == pytest.approx(120_000, rel=1e-6)


def test_spikes_shift_the_tail_as_the_mixture_predicts() -> None:
    m = LinkModel(
        median_ns=40_000,
        p99_ns=120_000,
        spike_prob=0.02,
        spike_min_ns=1_000_000,
        spike_max_ns=2_000_000,
    )
    a = np.array(draws(m), dtype=float)
    assert (a >= 1_000_000).mean() == pytest.approx(0.02, abs=0.004)
    for q in (0.5, 0.9, 0.995):
        assert np.percentile(a, 100 * q) == pytest.approx(m.quantile_ns(q), rel=0.06)


def test_loss_rate_and_lemons() -> None:
    m = LinkModel(loss=0.05, lemons=("slow",), lemon_factor=3.0)
    d = draws(m)
    lost = sum(x is None for x in d) / N
    assert lost == pytest.approx(0.05, abs=0.006)  # > 5 standard errors
    plain = np.array([x for x in draws(m, "a", "b") if x is not None], dtype=float)
    lemon = np.array([x for x in draws(m, "a", "slow") if x is not None], dtype=float)
    assert np.median(lemon) / np.median(plain) == pytest.approx(3.0, rel=0.05)
    assert m.link("slow", "x").factor == 3.0 and m.link("x", "y").factor == 1.0


def test_lemon_fraction_is_seeded() -> None:
    m = LinkModel(lemon_fraction=0.2, seed=9)
    picks = [m.is_lemon(f"r{i}") for i in range(2000)]
    assert sum(picks) / 2000 == pytest.approx(0.2, abs=0.04)
    assert picks == [LinkModel(lemon_fraction=0.2, seed=9).is_lemon(f"r{i}") for i in range(2000)]


def test_parse_off_and_on() -> None:
    assert parse_link_model(None) is None
    assert parse_link_model({}) is None
    assert parse_link_model({"enabled": False, "median_ns": 5}) is None
    m = parse_link_model({"seed": 2, "median_ns": 10_000, "p99_ns": 30_000, "loss": 0.1})
    assert m == LinkModel(seed=2, median_ns=10_000, p99_ns=30_000, loss=0.1)
    assert parse_link_model(m.to_dict()) == m


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"median_ns": -1}, "$.link_model.median_ns"),
        ({"median_ns": 10, "p99_ns": 5}, "$.link_model.p99_ns"),
        ({"loss": 1.5}, "$.link_model.loss"),
        ({"loss": "x"}, "$.link_model.loss"),
        ({"lemons": "r1"}, "$.link_model.lemons"),
        ({"bogus": 1}, "bogus"),
        ({"lemon_factor": 0.5}, "$.link_model.lemon_factor"),
        ({"spike_min_ns": 10, "spike_max_ns": 5}, "$.link_model.spike_max_ns"),
    ],
)
def test_parse_errors_name_the_field(doc: dict[str, object], where: str) -> None:
    with pytest.raises(LinkModelError, match=where.replace("$", r"\$")):
        parse_link_model(doc)


def test_emulated_at_is_validated_and_round_trips() -> None:
    m = parse_link_model({"median_ns": 10_000, "p99_ns": 20_000, "emulated_at": "receivers"})
    assert m is not None and m.emulated_at == "receivers"
    assert parse_link_model(m.to_dict()) == m
    default = parse_link_model({"median_ns": 10_000, "p99_ns": 20_000})
    assert default is not None and default.emulated_at == "hops"
    with pytest.raises(LinkModelError, match="emulated_at"):
        parse_link_model({"emulated_at": "relays"})
