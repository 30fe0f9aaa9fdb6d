import pytest
import torch

from symfast import groups
from symfast.groups import Group

ALL = [groups.trivial(), groups.flip_h(), groups.flip_v(), groups.c2(), groups.c4(), groups.d4(),
       groups.cyclic(5), groups.channel_perm([[1, 2, 0], [2, 0, 1]]), groups.sign_flip(),
       groups.product(groups.d4(), groups.sign_flip()),
       groups.product(groups.c4(), groups.channel_perm([[1, 0, 2]]))]


def _input_for(g: Group) -> torch.Tensor:
    if "cyclic" in g.name:
        return torch.randn(2, 3, 4, 5)
    return torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("g", ALL, ids=lambda g: g.name)
def test_group_axioms_hold_on_real_inputs(g):
    x = _input_for(g)
    assert torch.equal(g.act(x, 0), x)
    for i in range(len(g)):
        assert torch.equal(g.act(g.act(x, i), g.inverse(i)), x)
        for j in range(len(g)):
            assert torch.equal(g.act(g.act(x, j), i), g.act(x, g.compose(i, j)))


@pytest.mark.parametrize("g", ALL, ids=lambda g: g.name)
def test_gather_tables_reproduce_the_action(g):
    x = _input_for(g)
    event = x.shape[x.dim() - g.event_ndim:]
    table, inverse_table = g.tables(event)
    flat = x.reshape(-1, table.shape[1])
    for k in range(len(g)):
        for tab, elem in ((table, k), (inverse_table, g.inverse(k))):
            src = torch.where(tab[k] < 0, -tab[k].long() - 1, tab[k].long())
            sign = torch.where(tab[k] < 0, -1.0, 1.0)
            assert torch.equal((flat[:, src] * sign).reshape(x.shape), g.act(x, elem))


def test_orders_and_named_lookup():
    assert [len(groups.get(n)) for n in ("trivial", "flip_h", "flip_v", "c2", "c4", "d4", "sign")] == \
        [1, 2, 2, 2, 4, 8, 2]
    assert groups.get("d4") is groups.get("d4")  # tables are cached on the shared instance
    assert len(groups.product(groups.d4(), groups.sign_flip())) == 16
    # the README's spelling (the function's name) and the group's own name are the same group
    assert groups.get("sign_flip") is groups.get("sign") and groups.get("sign").name == "sign"


def test_tables_are_cached_per_shape_and_device():
    g = groups.get("c4")
    assert g.tables((4, 4))[0] is g.tables((4, 4))[0]
    assert g.tables((4, 4))[0] is not g.tables((6, 6))[0]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown group name 'd8'"):
        groups.get("d8")
    with pytest.raises(TypeError, match="group must be"):
        groups.get(4)
    with pytest.raises(ValueError, match=r"square.*H == W"):
        groups.get("c4").act(torch.randn(1, 3, 4, 5), 1)
    with pytest.raises(ValueError, match="needs size 5 at dim -1"):
        groups.cyclic(5).act(torch.randn(2, 4), 1)
    with pytest.raises(ValueError, match="not closed"):
        Group("bad", [lambda x: x, lambda x: torch.rot90(x, 1, (-2, -1))], event_ndim=2, probe_shape=(4, 4))
    with pytest.raises(ValueError, match="identity"):
        Group("bad", [lambda x: torch.flip(x, (-1,)), lambda x: x], event_ndim=1, probe_shape=(4,))
    with pytest.raises(ValueError, match="permutations of range"):
        groups.channel_perm([[0, 0, 1]])
    with pytest.raises(ValueError, match="positive int"):
        groups.cyclic(0)


def test_group_methods_use_the_ops():
    g = groups.get("d4")
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(g.orbit(x), torch.cat([g.act(x, k) for k in range(8)]))
    y = torch.randn(16, 3, 5, 5)
    want = sum(g.act(y[2 * k:2 * k + 2], g.inverse(k)) for k in range(8)) / 8
    assert (g.orbit_mean(y) - want).abs().max() <= 1e-6
