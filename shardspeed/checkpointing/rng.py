"""Named random-number-generator states for tensor-parallel dropout (Megatron's RNG tracker).

Two streams exist in a tensor-parallel model: the *default* generator, identical on every rank of
a tensor-parallel group (dropout on replicated activations must agree across the group), and the
*model-parallel* stream, different on each tensor-parallel rank (dropout on sharded activations
must not repeat the same mask in every shard). `RNGStatesTracker` keeps the second kind: named
generator states that `fork(name)` swaps in for the duration of a block and then stores back, so
the default generator is left exactly where it was.

"The device generator" is CUDA's (current device) when CUDA is available, else the CPU one: it is
the generator dropout on the model's activations draws from. DeepSpeed's names are kept
(`CudaRNGStatesTracker`, `get_cuda_rng_tracker`) although on a CPU-only machine the tracked states
are CPU generator states.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


def _on_cuda() -> bool:
    return torch.cuda.is_available()


def get_device_rng_state() -> torch.Tensor:
    """The device generator's state (a new tensor; later draws do not change it)."""
    return torch.cuda.get_rng_state() if _on_cuda() else torch.get_rng_state()


def set_device_rng_state(state: torch.Tensor) -> None:
    if _on_cuda():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def device_manual_seed(seed: int) -> None:
    """Seed the device generator only (CUDA's current device; on a CPU-only machine, the CPU one)."""
    if _on_cuda():
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class RNGStatesTracker:
    """Named device-generator states; `fork(name)` runs a block on one of them.

    Checkpointing snapshots `get_states()` at forward time and restores it around the recompute,
    so dropout inside `fork` draws the same masks twice.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        """Forget every tracked state and seed."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A shallow copy: `fork` replaces entries rather than mutating them, so this is a snapshot."""
        return copy.copy(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Track a new state `name`, seeded with `seed`; the device generator is left unchanged."""
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker: seed {seed} is already used by another state")
        if name in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} already exists")
        self.seeds_.add(seed)
        original = get_device_rng_state()
        device_manual_seed(seed)
        self.states_[name] = get_device_rng_state()
        set_device_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Draw from state `name` inside the block; store its advanced state and restore the default after."""
        if name not in self.states_:
            raise KeyError(f"RNG tracker: state {name!r} was never added (known: {sorted(self.states_)})")
        original = get_device_rng_state()
        set_device_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = get_device_rng_state()
            set_device_rng_state(original)


CudaRNGStatesTracker = RNGStatesTracker  # DeepSpeed's (and Megatron's) name

# Process-wide, as in DeepSpeed and Megatron: model code reaches it through get_cuda_rng_tracker().
_TRACKER = RNGStatesTracker()


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process's tracker (DeepSpeed's name; it tracks CPU states on a CPU-only machine)."""
    return _TRACKER
