"""minigpt: a GPT written from scratch in PyTorch that learns Tang poems, then learns to follow an instruction."""
