"""Sampling: noise schedules, classifier guidance, and the one reverse-diffusion loop."""
