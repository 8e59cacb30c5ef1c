"""Mixture of experts (DeepSpeed's `deepspeed.moe`): not built yet; the names resolve and refuse when used."""
