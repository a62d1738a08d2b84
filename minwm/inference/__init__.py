"""Inference pieces under WorldModel (minwm/world.py): the backbone text dict, the chunk samplers (few-step
consistency, multi-step CFG autoregressive, multi-step CFG bidirectional) and trajectory inputs."""
