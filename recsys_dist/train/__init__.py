"""Training: the DeepSpeed dense engine, the step, sharded losses, the loop and its outputs."""
