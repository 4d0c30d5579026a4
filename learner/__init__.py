"""Learner: DeepSpeed PSO trainer (built in a later issue)."""
