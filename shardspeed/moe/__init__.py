"""Mixture of experts with expert parallelism: DeepSpeed's `deepspeed.moe` (`layer.MoE`,
`sharded_moe.TopKGate` / `MOELayer` / `top1gating` / `top2gating` / `topkgating`, `experts.Experts`,
and the parameter-group helpers in `utils`). Routing equals DeepSpeed 0.19.8's; tokens move by
all-to-all-v without padding to capacity (`dispatch.py`)."""
