"""Root pytest configuration, shared by tests/, docs/ and the package doctests."""

import torch

# The test models are tiny: a second intra-op thread only adds contention on a busy machine.
torch.set_num_threads(1)
