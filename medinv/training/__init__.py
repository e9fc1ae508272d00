"""Training loops, losses, configurations and checkpoints."""
