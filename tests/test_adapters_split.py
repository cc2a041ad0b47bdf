"""The generic channel split: the rule per layer kind, ownership, merge, ties, validation."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

import adapters
from tests._adapters_support import TOLERANCE, check_ownership, deviation, numel, one_thread  # noqa: F401

Case = tuple[nn.Module, Callable[[], Any]]


class PosEmbed(nn.Module):
    """ViT-style free parameters: a position embedding, a class token and a layer scale."""

    def __init__(self, tokens: int, channels: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, channels))
        self.cls_token = nn.Parameter(torch.randn(1, 1, channels))
        self.gamma = nn.Parameter(torch.randn(channels))
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x + self.pos_embed], 1)
        return tokens * self.gamma * self.scale


def _call(module: nn.Module, args: Any) -> Any:
    out = module(*args) if isinstance(args, tuple) else module(args)
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return out[0]
    return out


def _read(module: nn.Module, name: str) -> Tensor:
    owner, _, leaf = name.rpartition(".")
    value: Tensor = getattr(module.get_submodule(owner), leaf)
    return value.detach().clone()


def _layer(data: st.DataObject) -> Case:
    kind = data.draw(st.sampled_from(
        ["conv", "conv_t", "linear", "batchnorm", "groupnorm", "layernorm", "instancenorm", "mha", "embedding",
         "lstm", "gru", "free", "stack"]
    ))
    channels = st.integers(1, 9)
    if kind in ("conv", "conv_t"):
        nd = data.draw(st.integers(1, 3))
        groups = data.draw(st.integers(1, 3))
        depthwise = data.draw(st.booleans())
        cin = groups * data.draw(st.integers(1, 3))
        cout = cin if depthwise else groups * data.draw(st.integers(1, 3))
        groups = cin if depthwise else groups
        k = data.draw(st.integers(1, 3))
        bias = data.draw(st.booleans())
        cls = {("conv", 1): nn.Conv1d, ("conv", 2): nn.Conv2d, ("conv", 3): nn.Conv3d,
               ("conv_t", 1): nn.ConvTranspose1d, ("conv_t", 2): nn.ConvTranspose2d,
               ("conv_t", 3): nn.ConvTranspose3d}[(kind, nd)]
        layer = cls(cin, cout, k, groups=groups, bias=bias)
        return layer, lambda: torch.randn(2, cin, *([4] * nd))
    if kind == "linear":
        cin, cout = data.draw(channels), data.draw(channels)
        return nn.Linear(cin, cout, bias=data.draw(st.booleans())), lambda: torch.randn(2, 3, cin)
    if kind == "batchnorm":
        c = data.draw(channels)
        return nn.BatchNorm2d(c), lambda: torch.randn(3, c, 4, 4)
    if kind == "groupnorm":
        g = data.draw(st.integers(1, 3))
        c = g * data.draw(st.integers(1, 3))
        return nn.GroupNorm(g, c), lambda: torch.randn(2, c, 5)
    if kind == "layernorm":
        c = data.draw(channels)
        return nn.LayerNorm([c, 3]), lambda: torch.randn(2, c, 3)
    if kind == "instancenorm":
        c = data.draw(channels)
        return nn.InstanceNorm1d(c, affine=True), lambda: torch.randn(2, c, 6)
    if kind == "mha":
        heads = data.draw(st.integers(1, 3))
        e = heads * data.draw(st.integers(1, 3))
        layer = nn.MultiheadAttention(e, heads, bias=data.draw(st.booleans()), add_bias_kv=data.draw(st.booleans()),
                                      batch_first=True)
        return layer, lambda: (torch.randn(2, 4, e),) * 3
    if kind == "embedding":
        n, c = data.draw(channels), data.draw(channels)
        return nn.Embedding(n, c), lambda: torch.randint(0, n, (2, 5))
    if kind in ("lstm", "gru"):
        cin, hidden = data.draw(channels), data.draw(channels)
        cls_rnn = nn.LSTM if kind == "lstm" else nn.GRU
        return cls_rnn(cin, hidden, batch_first=True), lambda: torch.randn(2, 3, cin)
    if kind == "free":
        tokens, c = data.draw(st.integers(1, 4)), data.draw(channels)
        return PosEmbed(tokens, c), lambda: torch.randn(2, tokens, c)
    c1, c2 = data.draw(channels), data.draw(channels)
    stack = nn.Sequential(nn.Conv2d(2, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
                          nn.ConvTranspose2d(c1, c2, 2, stride=2), nn.GroupNorm(1, c2))
    return stack, lambda: torch.randn(2, 2, 4, 4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), tasks=st.integers(2, 4))
def test_split_preserves_function_ownership_and_merges_back(data: st.DataObject, tasks: int) -> None:
    layer, make_input = _layer(data)
    names = [f"t{i}" for i in range(tasks)]
    x = make_input()
    reference = copy.deepcopy(layer)
    before = _call(layer, x)
    total = numel(layer)
    original_names = [n for n, _ in layer.named_parameters()]

    plan = adapters.split_plan(layer, names)
    for entry in plan:
        if entry.dim >= 0:
            assert max(entry.sizes) - min(entry.sizes) <= 1
            assert sum(entry.sizes) * entry.chunks == entry.shape[entry.dim]
    adapters.split_channels(layer, names)
    assert deviation(_call(layer, x), before) <= TOLERANCE
    check_ownership(layer, total)

    # the optimizer's view: noisy slices through functional_call equal slices that hold the noise
    owned = adapters.task_parameters(layer)
    noisy = {n: p + 0.01 for n, p in owned["t1"]}
    via_call = functional_call(layer, noisy, (x,) if not isinstance(x, tuple) else x)
    with torch.no_grad():
        for _, p in owned["t1"]:
            p.add_(0.01)
    in_place = _call(layer, x)
    assert deviation(via_call[0] if isinstance(via_call, tuple) else via_call, in_place) <= TOLERANCE

    values = {n: _read(layer, n) for n in original_names}  # what the split layer computes with
    adapters.merge(layer)
    assert [n for n, _ in layer.named_parameters()] == original_names
    assert all(torch.equal(p, values[n]) for n, p in layer.named_parameters())  # exact round trip
    assert type(layer) is type(reference)
    fresh = copy.deepcopy(reference)
    fresh.load_state_dict(layer.state_dict())
    assert deviation(_call(fresh, x), in_place) <= TOLERANCE


def test_rule_table() -> None:
    rule = adapters.split_rule
    conv_t = nn.ConvTranspose3d(4, 6, 2, groups=2)
    assert rule(conv_t, "weight", conv_t.weight).dim == 1
    assert rule(conv_t, "bias", conv_t.bias).dim == 0
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    assert rule(depthwise, "weight", depthwise.weight) == adapters.SplitRule(0, 1, "conv")
    qkv = nn.Linear(6, 18)
    assert rule(qkv, "weight", qkv.weight, "blocks.0.attn.qkv").chunks == 3
    assert rule(qkv, "weight", qkv.weight, "blocks.0.attn.proj").chunks == 1
    mha = nn.MultiheadAttention(6, 2, add_bias_kv=True)
    assert rule(mha, "in_proj_weight", mha.in_proj_weight).chunks == 3
    assert rule(mha, "bias_k", mha.bias_k).dim == 2
    lstm = nn.LSTM(3, 5)
    assert rule(lstm, "weight_hh_l0", lstm.weight_hh_l0).chunks == 4
    assert rule(nn.GRU(3, 5), "bias_ih_l0", nn.GRU(3, 5).bias_ih_l0).chunks == 3
    emb = nn.Embedding(10, 4)
    assert rule(emb, "weight", emb.weight).dim == 1
    free = PosEmbed(5, 8)
    assert rule(free, "pos_embed", free.pos_embed).dim == 2
    assert rule(free, "cls_token", free.cls_token).dim == 2
    assert rule(free, "gamma", free.gamma).dim == 0
    assert rule(free, "scale", free.scale).dim == -1
    assert adapters.channel_dim(nn.ConvTranspose1d(2, 3, 1), "weight", nn.ConvTranspose1d(2, 3, 1).weight) == 1


def test_fused_qkv_each_task_owns_its_share_of_q_k_and_v() -> None:
    mha = nn.MultiheadAttention(6, 2)
    weight = mha.in_proj_weight.detach().clone()
    adapters.split_channels(mha, ["a", "b"])
    owned = dict(adapters.task_parameters(mha)["a"])
    first = owned["parametrizations.in_proj_weight.original0"]
    expected = torch.cat([weight[0:3], weight[6:9], weight[12:15]])
    assert torch.equal(first, expected)


def test_free_parameters_split_along_channels() -> None:
    module = PosEmbed(5, 7)
    plan = {p.name: p for p in adapters.split_plan(module, ["a", "b", "c"])}
    assert plan["pos_embed"].dim == 2 and plan["pos_embed"].sizes == (3, 2, 2)
    assert plan["cls_token"].dim == 2
    assert plan["scale"].dim == -1 and plan["scale"].kind == "0-dim"
    adapters.split_channels(module, ["a", "b", "c"])
    owned = adapters.task_parameters(module)
    assert "parametrizations.scale.original0" in dict(owned["a"])
    assert all("scale" not in n for n, _ in owned["b"] + owned["c"])


def test_dims_override() -> None:
    module = PosEmbed(6, 4)
    plan = {p.name: p for p in adapters.split_plan(module, ["a", "b"], dims={"pos_embed": 1})}
    assert plan["pos_embed"].dim == 1 and plan["pos_embed"].kind == "override"
    assert plan["pos_embed"].sizes == (3, 3)


def test_too_small_parameters_follow_the_formula_or_raise() -> None:
    layer = nn.Conv2d(3, 2, 1)
    x = torch.randn(1, 3, 4, 4)
    before = layer(x)
    with pytest.raises(ValueError, match=r"weight \(2 channels along dim 0\)") as error:
        adapters.split_channels(layer, ["a", "b", "c"], small="raise")
    assert "small='split'" in str(error.value)
    assert not parametrize.is_parametrized(layer)
    adapters.split_channels(layer, ["a", "b", "c"])
    owned = adapters.task_parameters(layer)
    assert [p.shape[0] for _, p in owned["c"]] == [0, 0]  # empty slices: owns none of these channels
    assert torch.equal(layer(x), before)
    check_ownership(layer, 3 * 2 + 2)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.proj = nn.Linear(5, 7)
        self.proj.weight = self.embed.weight  # tied, as in a language model's output layer
        self.shared = nn.Linear(7, 7)
        self.again = self.shared  # one module registered twice

    def forward(self, ids: Tensor) -> Tensor:
        return self.again(self.shared(self.proj(self.embed(ids))))


def test_tied_parameters_are_split_once_and_stay_tied_through_training_and_merge() -> None:
    model = Tied()
    ids = torch.randint(0, 7, (3, 4))
    before = model(ids)
    total = numel(model)
    plan = {p.name: p for p in adapters.split_plan(model, ["a", "b"])}
    assert plan["embed.weight"].tied == ("proj.weight",)
    assert plan["embed.weight"].dim == 1  # the first owner (the embedding) decides
    adapters.split_channels(model, ["a", "b"])
    embed, proj = model.embed.parametrizations.weight, model.proj.parametrizations.weight
    assert embed.original0 is proj.original0 and embed.original1 is proj.original1
    assert torch.equal(model(ids), before)
    check_ownership(model, total)

    name, slice0 = adapters.task_parameters(model)["a"][0]
    assert name == "embed.parametrizations.weight.original0"
    via_call = functional_call(model, {name: slice0 + 0.1}, (ids,))  # reaches both tied uses
    with torch.no_grad():
        slice0.add_(0.1)
    assert torch.equal(via_call, model(ids))
    assert all(isinstance(p, nn.Parameter) for _, p in model.named_parameters(remove_duplicate=False))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids).square().mean().backward()
    optimizer.step()
    assert torch.equal(model.embed.weight, model.proj.weight.T.T)
    trained = model(ids).detach()

    adapters.merge(model)
    assert model.embed.weight is model.proj.weight
    assert torch.equal(model(ids), trained)
    fresh = Tied()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(ids), trained)


def test_tied_parameters_survive_cooperative_training() -> None:
    from cooperative_opt import CooperativeOptimizer

    class TiedEncoder(Tied):
        """Tied weights without the module registered twice, which torch.func.functional_call mishandles."""

        def __init__(self) -> None:
            super().__init__()
            del self.again

        def forward(self, ids: Tensor) -> Tensor:
            return self.shared(self.proj(self.embed(ids))).mean(1)

    encoder = TiedEncoder()
    net = adapters.multitask(encoder, {"a": nn.Linear(7, 3), "b": nn.Linear(7, 3)})
    ids = torch.randint(0, 7, (6, 4))
    batches = {t: (ids, torch.randint(0, 3, (6,))) for t in ("a", "b")}
    tasks = adapters.make_tasks(net, {"a": torch.nn.functional.cross_entropy, "b": torch.nn.functional.cross_entropy})
    opt = CooperativeOptimizer(net, tasks, torch.optim.SGD, lr=0.1, samples=2, warmup_steps=1, seed=0)
    for _ in range(3):
        opt.step(batches)
    assert all(isinstance(p, nn.Parameter) for _, p in net.named_parameters(remove_duplicate=False))
    assert encoder.embed.parametrizations.weight.original1 is encoder.proj.parametrizations.weight.original1
    trained = net(ids, "a").detach()
    adapters.merge(net)
    assert encoder.embed.weight is encoder.proj.weight
    assert torch.equal(net(ids, "a"), trained)


def test_frozen_parameters_stay_frozen_parameters() -> None:
    layer = nn.Linear(3, 4)
    layer.bias.requires_grad_(False)
    adapters.split_channels(layer, ["a", "b"])
    assert not layer.parametrizations.bias.original1.requires_grad
    adapters.merge(layer)
    assert isinstance(layer.bias, nn.Parameter) and not layer.bias.requires_grad
    assert "bias" not in dict(layer.named_buffers())


def test_merge_of_a_deep_copy_leaves_the_original_split() -> None:
    layer = adapters.split_channels(nn.Conv2d(2, 4, 3), ["a", "b"])
    x = torch.randn(1, 2, 5, 5)
    before = layer(x)
    copied = adapters.merge(copy.deepcopy(layer))
    assert parametrize.is_parametrized(layer)
    assert torch.equal(layer(x), before) and torch.equal(copied(x), before)


def test_vmap_over_noisy_slices() -> None:
    layer = adapters.split_channels(nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Conv2d(5, 3, 1)), ["a", "b"])
    x = torch.randn(2, 2, 6, 6)
    names = [n for n, _ in adapters.task_parameters(layer)["b"]]
    noise = {n: torch.randn(4, *dict(layer.named_parameters())[n].shape) * 0.01 for n in names}
    params = dict(layer.named_parameters())

    def run(eps: dict[str, Tensor]) -> Tensor:
        return functional_call(layer, {n: params[n] + e for n, e in eps.items()}, (x,))

    batched = vmap(run)(noise)
    for j in range(4):
        assert deviation(batched[j], run({n: e[j] for n, e in noise.items()})) <= TOLERANCE


def test_dtype_and_state_dict_round_trip() -> None:
    layer = adapters.split_channels(nn.Sequential(nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5)), ["a", "b", "c"])
    layer.double()
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    other = adapters.split_channels(nn.Sequential(nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5)), ["a", "b", "c"]).double()
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))


# ----------------------------------------------------------------- validation


def _snapshot(module: nn.Module) -> list[tuple[str, int, str]]:
    return [(n, id(p), type(m).__name__) for m in module.modules() for n, p in m.named_parameters(recurse=False)]


def test_errors_name_the_module_and_leave_it_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3)))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"module '1' \(ParametrizedConv2d\) already has parametrizations"):
        adapters.split_channels(model, ["a", "b"])
    assert _snapshot(model) == snapshot

    plain = nn.Sequential(nn.Linear(2, 3), PosEmbed(2, 3))
    snapshot = _snapshot(plain)
    with pytest.raises(ValueError, match=r"dims names parameters not in Sequential: \['pos_embed'\]"):
        adapters.split_channels(plain, ["a", "b"], dims={"pos_embed": 1})
    with pytest.raises(ValueError, match=r"dims\['1.pos_embed'\] = 5 is out of range for 1.pos_embed"):
        adapters.split_channels(plain, ["a", "b"], dims={"1.pos_embed": 5})
    with pytest.raises(ValueError, match="1.scale is a 0-dim parameter"):
        adapters.split_channels(plain, ["a", "b"], dims={"1.scale": 0})
    with pytest.raises(ValueError, match="at least two tasks"):
        adapters.split_channels(plain, ["a"])
    with pytest.raises(ValueError, match="unique"):
        adapters.split_channels(plain, ["a", "a"])
    with pytest.raises(TypeError, match="sequence of task names"):
        adapters.split_channels(plain, "ab")
    with pytest.raises(ValueError, match="small must be"):
        adapters.split_channels(plain, ["a", "b"], small="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no parameters"):
        adapters.split_channels(nn.ReLU(), ["a", "b"])
    with pytest.raises(ValueError, match="nothing to merge"):
        adapters.merge(plain)
    assert _snapshot(plain) == snapshot


def test_failure_while_converting_restores_the_original_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 4))
    snapshot = _snapshot(model)
    x = torch.randn(1, 1, 3, 6)
    model.eval()
    before = model(x)
    real = parametrize.register_parametrization
    calls = []

    def failing(module: nn.Module, name: str, parametrization: nn.Module, unsafe: bool = False) -> nn.Module:
        calls.append(name)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return real(module, name, parametrization, unsafe=unsafe)

    monkeypatch.setattr(parametrize, "register_parametrization", failing)
    with pytest.raises(RuntimeError, match="boom"):
        adapters.split_channels(model, ["a", "b"])
    assert _snapshot(model) == snapshot
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.equal(model(x), before)


def test_task_parameters_requires_a_split() -> None:
    with pytest.raises(ValueError, match="holds no channel-split module"):
        adapters.task_parameters(nn.Linear(2, 2))
