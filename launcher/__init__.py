"""`pso up`: the whole online loop on one machine, as separate processes (docs/launcher.md)."""
