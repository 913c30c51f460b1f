import math

import pytest

from mua_cli.errors import MuaError
from mua_cli.science.theory import REGIMES, get_regime, parse_lrs, parse_ranks, parse_regimes


@pytest.mark.parametrize(
    "name, exponent", [("A:r", 0.0), ("A:sqrt", -0.25), ("A:1", -0.5), ("B:r", 1.0), ("B:sqrt", 0.5), ("B:1", 0.0)]
)
def test_rank_exponents_match_design_table(name, exponent):
    assert get_regime(name).rank_exponent == exponent


@pytest.mark.parametrize("rank", [1, 4, 64, 1024])
@pytest.mark.parametrize("name", list(REGIMES))
def test_peft_mapping_realises_the_effective_multiplier(name, rank):
    """peft's scaling is lora_alpha / r (or / sqrt(r) with rslora); it must equal α = α0 r^-γ."""
    reg, alpha0 = get_regime(name), 2.0
    args = reg.peft_args(alpha0, rank)
    peft_scaling = args["lora_alpha"] / (math.sqrt(rank) if args["use_rslora"] else rank)
    assert peft_scaling == pytest.approx(reg.alpha(alpha0, rank))


def test_only_b1_transfers_to_full_finetuning():
    assert [r.name for r in REGIMES.values() if r.transfers_to_full_ft] == ["B:1"]


def test_parse_ranks_and_full():
    assert parse_ranks("4, 16,64,full") == [4, 16, 64, "full"]
    for bad in ("4,x", "0", "-2", ""):
        with pytest.raises(MuaError):
            parse_ranks(bad)


def test_parse_regimes_rejects_unknown():
    assert [r.name for r in parse_regimes("A:r,B:1,A:r")] == ["A:r", "B:1"]
    with pytest.raises(MuaError, match="unknown regime"):
        parse_regimes("C:2")


def test_parse_lrs_range_and_list():
    assert parse_lrs("2^-4:2^-2") == [2**-4, 2**-3, 2**-2]
    assert parse_lrs("1e-3,4e-3,2e-3") == [1e-3, 2e-3, 4e-3]
    for bad in ("2^-4:2^-3", "1e-3", "a,b,c", "-1,1,2"):
        with pytest.raises(MuaError):
            parse_lrs(bad)
