"""Alignment stages after SFT: reward modelling and reinforcement learning from feedback."""
