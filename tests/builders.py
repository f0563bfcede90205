"""Model builders for the tests (`model.name: import:tests.builders:NAME`). The workers import
them as a user's module: Ray puts the driver's working directory (the repo, for the tests) on
their path."""

from __future__ import annotations


def fails_when_built(**kwargs):
    """Takes the builders' arguments (the driver's check of its signature passes) and fails when
    the workers call it, every time: a bug in a user's builder. `count_file` (from
    model.kwargs): a line appended there per call, to count the attempts."""
    if "count_file" in kwargs:
        with open(kwargs["count_file"], "a") as f:
            f.write("built\n")
    raise TypeError(f"fails_when_built() cannot build a model from {sorted(kwargs)}")


def small_mlp(*, input_dim, num_outputs, vocab_size=None, per_token=False,
              activation_checkpointing=False, hidden=16):
    """A builder with named parameters only (no **kwargs): a `model.kwargs` key it does not
    take is refused before the cluster."""
    from torch import nn

    return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))


def batchnorm_mlp(*, input_dim, num_outputs, vocab_size=None, per_token=False,
                  activation_checkpointing=False, hidden=16):
    """`small_mlp` with a BatchNorm layer: `train.micro_batch_size: auto` would change the
    batch it normalises over on an out-of-memory, which the driver's checks refuse."""
    from torch import nn

    return nn.Sequential(nn.Linear(input_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, num_outputs))


def _registered(build):
    """A registry's decorator: the wrapper passes on only the arguments `build` names (the
    others, e.g. vocab_size for a vector model, are dropped)."""
    import functools
    import inspect

    takes = set(inspect.signature(build).parameters)

    @functools.wraps(build)
    def wrapper(**kwargs):
        return build(**{k: v for k, v in kwargs.items() if k in takes})

    return wrapper


@_registered
def registered_mlp(*, input_dim, num_outputs, hidden=16):
    """`small_mlp` behind a registry's decorator: its signature, as `inspect` shows it through
    functools.wraps, takes fewer arguments than the workers pass; the wrapper takes them all."""
    return small_mlp(input_dim=input_dim, num_outputs=num_outputs, hidden=hidden)


def oom_above_for_rank(*, input_dim, num_outputs, limits="100", **_):
    """A linear classifier that runs out of memory (CUDA's error, simulated) on a batch above
    its rank's limit: `limits` (model.kwargs) "L0,L1,...", by the RANK Ray Train sets (the
    last for higher ranks; 0 outside Ray Train): ranks of unequal memory."""
    import os

    import torch
    from torch import nn

    bounds = [int(v) for v in str(limits).split(",")]
    limit = bounds[min(int(os.environ.get("RANK", "0")), len(bounds) - 1)]

    class OOMAbove(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(input_dim, num_outputs)

        def forward(self, batch):
            x = batch["features"]
            if x.shape[0] > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: batch {x.shape[0]} "
                                             f"> {limit})")
            return self.linear(x.flatten(1))

    return OOMAbove()
