"""Reward server: FastAPI app and reward back-ends (built in a later issue)."""
