import ast
import subprocess
import sys
from pathlib import Path

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
    for bad in ([0, 1, 2], "abc", 3, [[0.0, 1.0]]):  # was "'int' object is not iterable"
        with pytest.raises(TypeError, match="perms must be a list of permutations"):
            groups.channel_perm(bad)
    assert len(groups.product("flip_h", "flip_v")) == 4  # names, as every other API takes
    with pytest.raises(ValueError, match="positive int"):
        groups.cyclic(0)
    with pytest.raises(ValueError, match="positive int, got True"):
        groups.cyclic(True)
    d4, x = groups.get("d4"), torch.randn(1, 3, 3)
    for bad in (-1, 8, 1.0, True, "1"):  # -1 wrapped to element 7 silently; 8 was an IndexError
        with pytest.raises(ValueError, match=r"k must be an element index, an int in \[0, 8\)"):
            d4.act(x, bad)
        with pytest.raises(ValueError, match="element index"):
            d4.inverse(bad)
    with pytest.raises(ValueError, match="j must be an element index"):
        d4.compose(1, 9)
    assert torch.equal(d4.act(x, torch.tensor(3)), d4.act(x, 3))  # integer scalars index too


def test_groups_module_imports_nothing_of_symfast():
    # groups sits below every other layer: importing it alone must not pull in symfast.ops
    # (Group.orbit once closed an import circle with ops/group_average.py).
    # Loaded from its file alone (importing symfast.groups would run symfast/__init__ first),
    # building and using a group must load no symfast module.
    code = ("import importlib.util as u, sys, torch\n"
            f"spec = u.spec_from_file_location('groups_alone', {groups.__file__!r})\n"
            "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "g = m.get('d4'); g.act(torch.zeros(1, 4, 4), 3); g.tables((4, 4))\n"
            "print(sorted(n for n in sys.modules if n.startswith('symfast')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # Nor anywhere in a function body (an import inside a method is the circle again).
    tree = ast.parse(Path(groups.__file__).read_text())
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])]
    assert not [m for m in imported if m and m.split(".")[0] == "symfast"]


def test_fixed_sizes_is_a_constructor_argument():
    g = groups.Group("roll3", [lambda x, s=s: torch.roll(x, s, -1) for s in range(3)], event_ndim=1,
                     probe_shape=(3,), fixed_sizes=[3])
    assert g.fixed_sizes == [3]
    with pytest.raises(ValueError, match="needs size 3"):
        g.check_input(torch.zeros(2, 4))
    assert groups.d4().fixed_sizes == [None, None]
    assert groups.product(groups.cyclic(3), groups.sign_flip()).fixed_sizes == [3]
    with pytest.raises(ValueError, match="fixed_sizes"):
        groups.Group("bad", [lambda x: x], event_ndim=1, probe_shape=(2,), fixed_sizes=[2, 2])
    with pytest.raises(ValueError, match="fixed_sizes"):
        groups.Group("bad", [lambda x: x], event_ndim=1, probe_shape=(2,), fixed_sizes=[0])




def test_groups_and_the_modules_holding_them_pickle(tmp_path):
    """Elements were lambdas: torch.save of an EquivariantUNet failed (and spawn-started workers)."""
    import pickle

    from symfast.nn import EquivariantUNet
    x = torch.randn(2, 3, 4, 4)
    for g in (groups.get(name) for name in ("d4", "c4", "flip_h", "flip_v", "c2", "trivial")):
        back = pickle.loads(pickle.dumps(g))
        assert len(back) == len(g) and all(torch.equal(back.act(x, k), g.act(x, k)) for k in range(len(g)))
    for g in (groups.cyclic(4), groups.channel_perm([[1, 0, 2]])):
        back = pickle.loads(pickle.dumps(g))
        y = torch.randn(3, 4) if g.event_ndim == 1 else x
        assert all(torch.equal(back.act(y, k), g.act(y, k)) for k in range(len(g)))
    torch.manual_seed(0)
    net = EquivariantUNet(1, 1, (4, 8), "d4").eval()
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    z, t = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert torch.equal(loaded(z, t), net(z, t))


# ---- found by a user tryout -----------------------------------------------------------------

def test_an_element_that_changes_the_shape_is_refused_not_squeezed_back():
    """A transpose on a (2, 3) event: its (3, 2) image was gathered into the (2, 3) table, so
    orbit and symmetrize returned scrambled values (symmetrize of the identity was not x)."""
    from symfast import ops, symmetrize
    transpose = Group("transpose", [lambda x: x, lambda x: x.transpose(-1, -2)], event_ndim=2,
                      probe_shape=(3, 3))
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    for run in (lambda: ops.orbit(x, transpose, backend="cpu"),
                lambda: ops.orbit(x, transpose, backend="reference"),
                lambda: symmetrize(lambda z: z, transpose)(x)):
        with pytest.raises(ValueError, match=r"element 1 maps an event of shape \(2, 3\) to \(3, 2\)"):
            run()
    square = torch.arange(9.0).reshape(1, 1, 3, 3)  # where it keeps the shape it is a group
    assert torch.equal(symmetrize(lambda z: z, transpose)(square), square)


def test_a_non_invertible_element_and_non_commuting_factors_are_named():
    with pytest.raises(ValueError, match="group 'collapse': element 1 has no inverse"):
        Group("collapse", [lambda x: x, lambda x: x[..., [0, 0, 2]]], event_ndim=1, probe_shape=(3,))
    # c4 and flip_h do not commute: their "product" was accepted (it closes, as D4)
    with pytest.raises(ValueError, match=r"product\(c4, flip_h\): .* do not commute"):
        groups.product(groups.c4(), groups.flip_h())
    assert len(groups.product(groups.flip_h(), groups.flip_v())) == 4


def test_within_is_judged_on_a_probe_both_groups_act_on_faithfully():
    """flip_v's own probe is (4, 1), on which c2's rotation by 180° moves every entry as the
    vertical flip does: flip_v was "within" c2, so a Denoiser skipped averaging a c2 network
    under flip_v (equivariance error 0.63). Groups acting on fewer dims are judged on the larger
    probe (flip_h within d4), and fixed sizes that differ mean not within."""
    g = groups
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    c3 = g.channel_perm([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    # on channel_perm's own (3, 1, 1) probe, a channel swap with a flip acts as the swap alone
    swap = g.channel_perm([[0, 1, 2], [1, 0, 2]])
    swap_and_flip = Group("swap_and_flip", [lambda t: t, lambda t: t[..., [1, 0, 2], :, :].flip(-1)],
                          event_ndim=3, probe_shape=(3, 1, 4), fixed_sizes=[3, None, None])
    pairs = [(g.flip_v(), g.c2()), (g.flip_h(), g.c2()), (g.c2(), g.flip_v()), (g.flip_v(), g.c4()),
             (g.product(g.flip_v(), g.sign_flip()), g.product(g.c2(), g.sign_flip())),
             (g.flip_h(), g.d4()), (g.flip_v(), g.d4()), (g.c2(), g.d4()), (g.c4(), g.d4()),
             (g.d4(), g.c4()), (g.sign_flip(), g.d4()), (g.trivial(), g.d4()),
             (g.product(g.flip_h(), g.flip_v()), g.d4()), (g.cyclic(5), g.flip_h()),
             (c3, g.product(g.d4(), c3)), (swap, swap_and_flip)]
    for sub, other in pairs:
        # the truth, from the actions on a random event of every dim both act on
        truth = all(any(torch.equal(sub.act(x, k), other.act(x, j)) for j in range(len(other)))
                    for k in range(len(sub)))
        assert sub.within(other) == truth, (sub.name, other.name)
    assert not g.flip_v().within(g.c2()) and g.flip_h().within(g.d4())
    assert not g.cyclic(5).within(g.cyclic(3))


def test_indices_in_matches_elements_by_their_action_on_every_entry():
    """Each element's index in another group, checked against acting on a random image."""
    d4 = groups.d4()
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    for sub in (groups.c2(), groups.c4(), groups.flip_h(), groups.flip_v(), d4):
        indices = sub.indices_in(d4, x.shape)
        assert len(indices) == len(sub) and None not in indices
        for k, j in enumerate(indices):
            assert torch.equal(sub.act(x, k), d4.act(x, j))
    # d4's reflections are not in c4; sign_flip's negation is in no pixel group
    assert groups.d4().indices_in(groups.c4(), (4, 4)) == [0, 1, 2, 3, None, None, None, None]
    assert groups.sign_flip().indices_in(d4, (4, 4)) == [0, None]
    with pytest.raises(ValueError, match=r"event_shape has shape \(4, 5\); group d4 contains rotations"):
        d4.indices_in(d4, (4, 5))
