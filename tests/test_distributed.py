"""torch.distributed (gloo, CPU): R ranks with shards compute what one process computes on the whole batch.

Each test spawns 2 or 3 processes that run a scenario below and save what they
measured; the test process compares the ranks with each other (bit for bit)
and with a single-process run on the concatenated batches (float tolerance:
the all-reduce sums the shards' gradients in another order).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of
from tests._ranks import spawn_ranks
from tests.test_user_loop import user_loop

NAMES = ["a", "b"]
BATCH = 12  # divisible by 2 and 3 ranks
STEPS = 3
CONFIGS: list[dict[str, Any]] = [
    dict(variant="vanilla", optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
    dict(variant="without_reg", optimizer=torch.optim.AdamW, lr=1e-2),
    dict(variant="mt_cool", samples=2, consistency_weight=0.5, optimizer=torch.optim.SGD, lr=0.1, momentum=0.9),
    dict(variant="without_reg", inner_steps=2, optimizer=torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    dict(variant="mt_cool", samples=2, inner_steps=2, warmup_steps=1, optimizer=torch.optim.SGD, lr=0.1),
    dict(variant="without_reg", update_order="jacobi", optimizer=torch.optim.SGD, lr=0.1, momentum=0.9),
]


def _opt(model: nn.Module, config: dict[str, Any], **extra: Any) -> CooperativeOptimizer:
    kwargs = {**config, **extra}
    optimizer = kwargs.pop("optimizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CooperativeOptimizer(model, make_tasks(model, NAMES), optimizer, seed=kwargs.pop("seed", 5), **kwargs)


def _model(rank: int = 0, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = make_model(NAMES, **kwargs)
    if rank:
        with torch.no_grad():  # different initial values on other ranks: the optimizer broadcasts rank 0's
            next(model.parameters()).add_(float(rank))
    return model


def _shard(batches: dict[str, tuple[Tensor, Tensor]], rank: int, world: int) -> dict[str, tuple[Tensor, Tensor]]:
    size = len(next(iter(batches.values()))[0]) // world
    return {k: (x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]) for k, (x, y) in batches.items()}


def _halves(batches: dict[str, tuple[Tensor, Tensor]]) -> list[dict[str, tuple[Tensor, Tensor]]]:
    return [{k: (x[h::2], y[h::2]) for k, (x, y) in batches.items()} for h in range(2)]


def _accumulating_loop(model: Any, opt: CooperativeOptimizer, micro: list[dict[str, tuple[Tensor, Tensor]]]) -> None:
    """Two micro-batches per task before its step, each backward averaged over the ranks (no ``no_sync``);
    with M = 1 the second forward draws fresh noise."""
    for name in opt.iteration():
        for batch in micro:
            with opt.perturb(name):
                out = model(batch[name][0], name)
            (F.cross_entropy(out, batch[name][1]) / len(micro)).backward()
        opt.step()
        opt.zero_grad()


def _drive(model: Any, opt: CooperativeOptimizer, path: str, batches: dict[str, tuple[Tensor, Tensor]],
           rank: int = 0, world: int = 1) -> None:
    if path == "step":
        opt.step(_shard(batches, rank, world))
    elif path == "loop":
        user_loop(model, opt, _shard(batches, rank, world))
    else:
        _accumulating_loop(model, opt, [_shard(half, rank, world) for half in _halves(batches)])


#: (config, path) pairs the equivalence test runs: every config both ways, two also with accumulation
PATHS = [(c, path) for c in range(len(CONFIGS)) for path in ("step", "loop")] + [(1, "accumulate"), (2, "accumulate")]


def _state(opt: CooperativeOptimizer) -> dict[str, Tensor]:
    out = {}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"{i}.{k}"] = torch.as_tensor(v).clone()
    return out


# ----------------------------------------------------------------- scenarios (run on every rank)


def _equivalence(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for c, path in PATHS:
        model = _model(rank)
        opt = _opt(model, CONFIGS[c])
        for s in range(STEPS):
            _drive(model, opt, path, make_batches(NAMES, n=BATCH, seed=s), rank, world)
        results[f"{c}-{path}"] = (params_of(model), _state(opt))
    return results


def _per_rank_noise(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    model = _model(rank)
    opt = _opt(model, CONFIGS[1], noise="per_rank", bound=0.5)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    noisy = []
    for s in range(STEPS):
        batches = _shard(make_batches(NAMES, n=BATCH, seed=s), rank, world)
        for name in opt.iteration():
            with opt.perturb(name):
                out = model(batches[name][0], name)
            F.cross_entropy(out, batches[name][1]).backward()
            with torch.no_grad(), opt.perturb(name):  # after the backward: the noise buffers are free again
                noisy.append(model(x, name))
            opt.step()
            opt.zero_grad()
    return {"params": params_of(model), "noisy": torch.stack(noisy)}


def _mismatch(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    model = _model()
    try:
        _opt(model, CONFIGS[1], bound=0.05 if rank == 0 else 0.1)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def _wrapped_refused(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    errors: dict[str, str | None] = {}
    model = _model()
    try:
        CooperativeOptimizer(nn.parallel.DistributedDataParallel(model), make_tasks(model, NAMES))
        errors["ddp"] = None
    except ValueError as error:
        errors["ddp"] = str(error)
    sharded = fully_shard(_model())
    try:
        CooperativeOptimizer(sharded, make_tasks(sharded, NAMES))  # type: ignore[arg-type]
        errors["fsdp"] = None
    except ValueError as error:
        errors["fsdp"] = str(error)
    return errors


def _batchnorm_rule(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    model = _model(batchnorm=True)
    opt = _opt(model, CONFIGS[1])
    for s in range(STEPS):
        opt.step(_shard(make_batches(NAMES, n=BATCH, seed=s), rank, world))
    return {"buffers": {n: b.clone() for n, b in model.named_buffers()}, "params": params_of(model)}


def _scaler_inf_on_one_rank(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    model = _model()
    opt = _opt(model, CONFIGS[1])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = _shard(make_batches(NAMES, n=BATCH, seed=0), rank, world)
    for name in opt.iteration():
        with opt.perturb(name):
            loss = F.cross_entropy(model(batches[name][0], name), batches[name][1])
        if name == "a" and rank == 1:
            loss = loss * float("inf")  # only rank 1 overflows; the averaged gradient is inf on every rank
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    report = opt.last_report
    return {"params": params_of(model), "skipped": dict(report.skipped) if report else None,
            "scale": scaler.get_scale()}


def _nan_loss_on_one_rank(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """step(batches): rank 1's shard of task a is NaN; every rank must skip a and step b, in step with the others."""
    out: dict[str, Any] = {}
    for scaled in (False, True):
        model = _model()
        opt = _opt(model, CONFIGS[1])
        before = params_of(model)
        batches = _shard(make_batches(NAMES, n=BATCH, seed=0), rank, world)
        if rank == 1:
            batches["a"] = (torch.full_like(batches["a"][0], float("nan")), batches["a"][1])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
        report = opt.step(batches, scaler=scaler)
        owner = {n: tp.name for tp in opt.task_params for n, p in model.named_parameters()
                 if any(p is q for q in tp.own)}
        moved = sorted({owner[n] for n, p in params_of(model).items() if not torch.equal(p, before[n])})
        following = opt.step(_shard(make_batches(NAMES, n=BATCH, seed=1), rank, world), scaler=scaler)
        out[f"scaled={scaled}"] = {"skipped": dict(report.skipped), "losses": sorted(report.losses), "moved": moved,
                                   "params": params_of(model), "following": dict(following.skipped)}
    model = _model()
    strict = _opt(model, CONFIGS[1], nonfinite="raise")
    batches = _shard(make_batches(NAMES, n=BATCH, seed=0), rank, world)
    if rank == 1:
        batches["a"] = (torch.full_like(batches["a"][0], float("nan")), batches["a"][1])
    try:
        strict.step(batches)
        out["raised"] = None
    except FloatingPointError as error:
        out["raised"] = str(error)
    return out


def _checkpoint(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    batches = [_shard(make_batches(NAMES, n=BATCH, seed=s), rank, world) for s in range(4)]
    model = _model()
    opt = _opt(model, CONFIGS[2])
    for b in batches[:2]:
        opt.step(b)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp / "ckpt.pt")
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "cooperative": opt.state_dict()["cooperative"]},
             checkpoint_id=tmp / "dcp")
    dist.barrier()
    for b in batches[2:]:
        opt.step(b)
    through = params_of(model)

    resumed_model = _model(rank)
    resumed = _opt(resumed_model, CONFIGS[2], seed=999)
    saved = torch.load(tmp / "ckpt.pt", weights_only=False)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    for b in batches[2:]:
        resumed.step(b)

    dcp_model = _model(rank)
    dcp_opt = _opt(dcp_model, CONFIGS[2], seed=999)
    model_sd, optim_sd = get_state_dict(dcp_model, dcp_opt)
    loaded = {"model": model_sd, "optim": optim_sd, "cooperative": dcp_opt.state_dict()["cooperative"]}
    dcp.load(loaded, checkpoint_id=tmp / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        set_state_dict(dcp_model, dcp_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    dcp_opt.load_state_dict({"cooperative": loaded["cooperative"]})
    for b in batches[2:]:
        dcp_opt.step(b)
    return {"through": through, "resumed": params_of(resumed_model), "dcp": params_of(dcp_model)}


def _buckets(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """A task with about 4 MiB of gradients: its first buckets are launched from the hooks, mid-backward."""
    from cooperative_opt import _distributed

    launched: list[str] = []
    launch, finish = _distributed.Ranks._launch, _distributed.Ranks._finish
    inside: list[bool] = [False]

    def counting_launch(self: Any, kind: Any) -> None:
        if self._buckets.get(kind):
            launched.append("at the end" if inside[0] else "mid-backward")
        launch(self, kind)

    def marked_finish(self: Any) -> None:
        inside[0] = True
        try:
            finish(self)
        finally:
            inside[0] = False

    _distributed.Ranks._launch, _distributed.Ranks._finish = counting_launch, marked_finish  # type: ignore[method-assign]
    model = _model(width=256, hidden=2048)  # Linear(1024, 2048) split in two: 4 MiB per task
    opt = _opt(model, CONFIGS[0])
    opt.step(_shard(make_batches(NAMES, n=BATCH, seed=0), rank, world))
    ranks = opt._ranks
    assert ranks is not None
    return {"launched": launched, "bucket": ranks.bucket_bytes, "params": params_of(model)}


SCENARIOS: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    f.__name__.lstrip("_"): f
    for f in (_equivalence, _per_rank_noise, _mismatch, _wrapped_refused, _batchnorm_rule, _scaler_inf_on_one_rank,
              _checkpoint, _buckets, _nan_loss_on_one_rank)
}


def _spawn(scenario: str, world: int, tmp_path: Path) -> list[dict[str, Any]]:
    return spawn_ranks(SCENARIOS[scenario], world, tmp_path)


def _identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _close(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_with_shards_equal_one_process_on_the_whole_batch(world: int, tmp_path: Path) -> None:
    ranks = _spawn("equivalence", world, tmp_path)
    for key in ranks[0]:
        for other in ranks[1:]:  # every rank bit-identical: parameters and optimizer state
            assert _identical(ranks[0][key][0], other[key][0]), key
            assert _identical(ranks[0][key][1], other[key][1]), key
    for c, path in PATHS:
        model = _model()
        opt = _opt(model, CONFIGS[c])
        for s in range(STEPS):
            _drive(model, opt, path, make_batches(NAMES, n=BATCH, seed=s))
        _close(ranks[0][f"{c}-{path}"][0], params_of(model))
        _close(ranks[0][f"{c}-{path}"][1], _state(opt))


def test_a_task_s_first_buckets_are_reduced_while_its_backward_goes_on(tmp_path: Path) -> None:
    ranks = _spawn("buckets", 2, tmp_path)
    assert _identical(ranks[0]["params"], ranks[1]["params"])
    for r in ranks:
        assert 2**20 <= r["bucket"] < 1.1 * 2**20  # a quarter of a task's ~4 MiB
        per_task = len(r["launched"]) // len(NAMES)
        assert per_task >= 2 and r["launched"].count("mid-backward") >= len(NAMES), r["launched"]


def test_the_default_bucket_is_a_quarter_of_the_largest_task_between_1_and_25_mib() -> None:
    from cooperative_opt._distributed import default_bucket_bytes
    from cooperative_opt._ownership import TaskParameters

    def task(*sizes: int) -> TaskParameters:
        params = tuple(nn.Parameter(torch.empty(n)) for n in sizes)
        return TaskParameters("t", params, tuple(f"p{i}" for i in range(len(sizes))), ())

    mib = 2**20
    assert default_bucket_bytes([task(10), task(20)]) == mib  # tiny tasks: the 1 MiB floor
    assert default_bucket_bytes([task(2 * mib), task(3 * mib, mib)]) == mib * 4  # 16 MiB of float32 / 4
    assert default_bucket_bytes([task(100 * mib)]) == 25 * mib  # DDP's cap
    assert default_bucket_bytes([]) == mib


def test_per_rank_noise_differs_across_ranks_and_ranks_stay_identical(tmp_path: Path) -> None:
    ranks = _spawn("per_rank_noise", 2, tmp_path)
    assert _identical(ranks[0]["params"], ranks[1]["params"])
    assert not torch.equal(ranks[0]["noisy"], ranks[1]["noisy"])


def test_misbuilt_ranks_and_ddp_or_fsdp_wrapped_models_are_refused(tmp_path: Path) -> None:
    ranks = _spawn("mismatch", 2, tmp_path)
    for r in ranks:  # the same clear error on every rank, no hang
        assert r["error"] is not None and "built CooperativeOptimizer differently" in r["error"]
        assert "settings" in r["error"]
    wrapped = _spawn("wrapped_refused", 2, tmp_path)
    assert all(r["ddp"] is not None and "pass the module itself (model.module)" in r["ddp"] for r in wrapped)
    assert all(r["fsdp"] is not None and "FSDP2 (fully_shard)" in r["fsdp"] for r in wrapped)


def test_batchnorm_statistics_stay_identical_across_ranks(tmp_path: Path) -> None:
    ranks = _spawn("batchnorm_rule", 2, tmp_path)
    assert _identical(ranks[0]["buffers"], ranks[1]["buffers"])
    assert _identical(ranks[0]["params"], ranks[1]["params"])


def test_gradscaler_overflow_on_one_rank_skips_the_task_on_every_rank(tmp_path: Path) -> None:
    ranks = _spawn("scaler_inf_on_one_rank", 2, tmp_path)
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == {"a": "not stepped"}
    assert ranks[0]["scale"] == ranks[1]["scale"] < 2.0**8
    assert _identical(ranks[0]["params"], ranks[1]["params"])


def test_a_nan_loss_on_one_rank_skips_that_task_on_every_rank_in_step_batches(tmp_path: Path) -> None:
    ranks = _spawn("nan_loss_on_one_rank", 2, tmp_path)
    for key in ("scaled=False", "scaled=True"):
        zero, one = ranks[0][key], ranks[1][key]
        assert zero["skipped"] == one["skipped"] == {"a": "non-finite loss"}, key
        assert zero["losses"] == one["losses"] == ["b"], key  # only the stepped task's loss is reported
        assert zero["moved"] == one["moved"] == ["b"], key  # b's parameters moved, none of a's, on both ranks
        assert zero["following"] == one["following"] == {}, key  # the next outer iteration steps every task
        assert _identical(zero["params"], one["params"]), key
    # nonfinite="raise": every rank raises, and the rank whose own loss was finite says where it was not
    assert ranks[1]["raised"] is not None and "task 'a': loss is nan at step 1" in ranks[1]["raised"]
    assert ranks[0]["raised"] is not None and "on this rank but non-finite on another" in ranks[0]["raised"]


def test_save_on_rank_0_and_dcp_resume_on_every_rank_bit_identically(tmp_path: Path) -> None:
    ranks = _spawn("checkpoint", 2, tmp_path)
    for r in ranks:
        assert _identical(r["through"], r["resumed"])
        assert _identical(r["through"], r["dcp"])
    assert _identical(ranks[0]["through"], ranks[1]["through"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_single_rank_with_syncbatchnorm_equals_no_process_group(tmp_path: Path) -> None:
    """One GPU here at most: the NCCL collective path on one rank (SyncBatchNorm needs CUDA in torch)."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        results = []
        for group in (dist.group.WORLD, None):
            torch.manual_seed(0)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(make_model(NAMES, batchnorm=True)).cuda()
            opt = _opt(model, CONFIGS[2], process_group=group)
            assert opt.world_size == 1 and (opt._ranks is not None) is (group is not None)
            for s in range(STEPS):
                opt.step({k: (x.cuda(), y.cuda()) for k, (x, y) in make_batches(NAMES, n=BATCH, seed=s).items()})
            results.append(params_of(model))
        _close(results[0], results[1])
    finally:
        dist.destroy_process_group()
