"""Pipeline parallelism: DeepSpeed's `deepspeed.pipe` names.

    from shardspeed.pipe import PipelineModule, LayerSpec, TiedLayerSpec
    net = PipelineModule(layers=[...], loss_fn=..., num_stages=2)
    engine, *_ = shardspeed.initialize(model=net, config=cfg)   # a PipelineEngine
    loss = engine.train_batch(data_iter)

See docs/pipeline.md.
"""
from ..comm.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology
from .checkpoint import load_layer_states
from .engine import PipelineEngine, PipeStats
from .module import LayerSpec, PipelineError, PipelineModule, TiedLayerSpec
from .schedule import Step, gpipe, inference, one_f_one_b

__all__ = [
    "LayerSpec", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipeStats", "PipelineEngine",
    "PipelineError", "PipelineModule", "ProcessTopology", "Step", "TiedLayerSpec", "gpipe", "inference",
    "load_layer_states", "one_f_one_b",
]
