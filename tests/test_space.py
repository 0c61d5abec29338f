"""ParamSpace: construction, flattening, subsets and mismatch errors."""

import pytest
import torch
from torch import nn

from curvmerge import ParamSpace, SpaceMismatchError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_from_module_state_dict_and_tensors_agree():
    m = _model()
    a = ParamSpace.from_module(m)
    b = ParamSpace.from_state_dict(m.state_dict())
    assert a == b
    assert a.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert a.size == 3 * 4 + 4 + 4 * 2 + 2


def test_flatten_unflatten_round_trip_and_many():
    m = _model()
    space = ParamSpace.from_module(m)
    params = dict(m.named_parameters())
    flat = space.flatten(params)
    back = space.unflatten(flat)
    for n in space.names:
        assert torch.equal(back[n], params[n].detach())
    M = space.flatten_many([params, space.zeros()])
    assert M.shape == (space.size, 2)
    assert torch.equal(M[:, 0], flat)
    assert isinstance(space.unflatten(M), list)


def test_select_by_regex_and_list_keeps_order():
    space = ParamSpace.from_module(_model())
    assert space.select(r"^0\.").names == ("0.weight", "0.bias")
    assert space.select(["2.bias", "0.weight"]).names == ("0.weight", "2.bias")
    with pytest.raises(SpaceMismatchError, match="no parameter name matches"):
        space.select("head")
    with pytest.raises(SpaceMismatchError, match="'classifier.weight' is not in the space"):
        space.select(["classifier.weight"])


def test_check_names_first_mismatch():
    m = _model()
    space = ParamSpace.from_module(m)
    params = {n: p.detach() for n, p in m.named_parameters()}
    del params["2.weight"]
    with pytest.raises(SpaceMismatchError, match="'2.weight' is missing"):
        space.check(params)
    params["2.weight"] = torch.zeros(3, 3)
    with pytest.raises(
        SpaceMismatchError, match=r"'2.weight' has shape \(3, 3\), expected \(2, 4\)"
    ):
        space.check(params)
    params["2.weight"] = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(SpaceMismatchError, match="'2.weight' has dtype torch.float64"):
        space.check(params)


def test_extra_names_are_ignored_and_duplicates_refused():
    space = ParamSpace(("a",), ((2,),))
    assert space.flatten({"a": torch.ones(2), "head": torch.ones(5)}).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="more than once"):
        ParamSpace(("a", "a"), ((1,), (1,)))
    with pytest.raises(SpaceMismatchError, match="size P=2"):
        space.unflatten(torch.ones(3))
