"""Actors: sampling workers that produce scored trajectory groups (built in a later issue)."""
