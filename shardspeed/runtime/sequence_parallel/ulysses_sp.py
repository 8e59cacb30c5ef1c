"""DeepSpeed's `deepspeed.runtime.sequence_parallel.ulysses_sp` (Ulysses sequence parallelism): not built yet."""
from __future__ import annotations

from ...config.unbuilt import unbuilt_class

_FEATURE = "Ulysses sequence parallelism"
UlyssesSPAttentionHF = unbuilt_class(_FEATURE, "deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF")
UlyssesSPDataLoaderAdapter = unbuilt_class(_FEATURE, "deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPDataLoaderAdapter")
