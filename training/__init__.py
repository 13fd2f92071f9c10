"""The machinery train.py's loop calls: the resolved configuration and its flags (config.py),
what each stage trains on (stages.py), checkpoints and resume (checkpointing.py), the device
and signals (runtime.py), progress, FLOP counting and loss curves (progress.py)."""
