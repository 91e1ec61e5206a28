import pytest

from masasurgery import ConfigError, MasaConfig


def test_roles_are_validated_and_ordered():
    assert MasaConfig(atoms=3, roles=("v", "q")).roles == ("q", "v")
    with pytest.raises(ConfigError, match=r"subset of \['q', 'k', 'v', 'o'\]"):
        MasaConfig(atoms=3, roles=("q", "x"))
    with pytest.raises(ConfigError, match="non-empty"):
        MasaConfig(atoms=3, roles=())


@pytest.mark.parametrize("atoms", [0, -2])
def test_atoms_below_one_is_an_error(atoms):
    with pytest.raises(ConfigError, match=f"at least 1, got {atoms}"):
        MasaConfig(atoms=atoms)


@pytest.mark.parametrize("atoms", [2.5, 4.0, "4", True, None])
def test_atoms_must_be_an_integer(atoms):
    with pytest.raises(ConfigError, match="positive integer") as info:
        MasaConfig(atoms=atoms)
    assert isinstance(info.value, ValueError)
    assert type(atoms).__name__ in str(info.value)


def test_json_round_trip():
    config = MasaConfig(atoms=4, roles=("q", "k", "o"))
    assert MasaConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown MasaConfig keys"):
        MasaConfig.from_dict({"atoms": 2, "rank": 3})
