"""The harness: configs, the trainer, checkpoints and monitoring (`python -m mpxla.train`)."""
