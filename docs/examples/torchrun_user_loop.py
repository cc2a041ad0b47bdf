"""MT-COOL in your own training loop on R ranks, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 docs/examples/torchrun_user_loop.py

Every rank builds the same model and optimizer; ``CooperativeOptimizer`` finds
the process group torchrun's environment set up, broadcasts rank 0's
parameters, and averages each stepping task's gradients over the ranks during
its backward, so the ranks stay identical. ``DistributedSampler`` gives each
rank its own shard of every task's data. Do not wrap the model in
``DistributedDataParallel``: the optimizer does the averaging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import adapters
from cooperative_opt import CooperativeOptimizer, Task

TASKS = ("even", "odd")


class Net(nn.Module):
    """A small shared encoder and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({task: nn.Linear(32, 5) for task in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        logits: Tensor = self.heads[task](self.encoder(x))
        return logits


def cross_entropy(output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``Task.loss(model output, batch)`` (what ``opt.step(batches)`` would call; this loop computes its own)."""
    return F.cross_entropy(output, batch[1])


def task_data(task: str, size: int = 256) -> TensorDataset:
    """Synthetic images whose class is set by their mean brightness (the same on every rank)."""
    g = torch.Generator().manual_seed(TASKS.index(task))
    y = torch.randint(0, 5, (size,), generator=g)
    x = torch.randn(size, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def main(epochs: int = 3, batch_size: int = 16) -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # reads RANK, WORLD_SIZE, MASTER_* set by torchrun
    rank = dist.get_rank()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if use_cuda else "cpu")
    torch.manual_seed(0)
    model = Net().to(device)
    adapters.split_channels(model.encoder, list(TASKS))
    tasks = [Task(task, loss=cross_entropy, head=model.heads[task]) for task in TASKS]
    opt = CooperativeOptimizer(model, tasks, torch.optim.SGD, lr=0.1, samples=2, seed=0)

    datasets = {task: task_data(task) for task in TASKS}
    samplers: dict[str, DistributedSampler[tuple[Tensor, ...]]] = {
        task: DistributedSampler(data, shuffle=True, seed=0) for task, data in datasets.items()}
    loaders = {task: DataLoader(datasets[task], batch_size=batch_size, sampler=samplers[task]) for task in TASKS}
    for epoch in range(epochs):
        for sampler in samplers.values():
            sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        total = torch.zeros(len(TASKS), device=device)
        steps = 0
        for batches in zip(*loaders.values()):  # one batch per task, this rank's shard
            batch = {task: (x.to(device), y.to(device)) for task, (x, y) in zip(TASKS, batches)}
            for name in opt.iteration():
                x, y = batch[name]
                outputs = []
                for _ in range(opt.settings.samples):  # M noise samples
                    with opt.perturb(name):  # the other tasks' encoder slices see noise
                        outputs.append(model(x, name))
                loss = torch.stack([F.cross_entropy(out, y) for out in outputs]).mean()
                (loss + opt.consistency(name, outputs)).backward()  # averages `name`'s gradients over the ranks
                opt.step()
                opt.zero_grad()
                total[TASKS.index(name)] += loss.detach()
            steps += 1
        dist.all_reduce(total)  # the training loss over every rank's shard, for the log line
        mean = (total / (steps * dist.get_world_size())).tolist()
        if rank == 0:
            losses = ", ".join(f"{task} {value:.3f}" for task, value in zip(TASKS, mean))
            print(f"epoch {epoch}: world_size={opt.world_size}, training loss {losses}", flush=True)
    dist.barrier()  # every rank done before any closes its connections
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
