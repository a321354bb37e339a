"""Command-line launcher: prepare data, launch training (local / torchrun / deepspeed), demo."""
