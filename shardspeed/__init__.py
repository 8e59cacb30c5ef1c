"""shardspeed: DeepSpeed-compatible large-model training for PyTorch."""
__version__ = "0.1.0"
