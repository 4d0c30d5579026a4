"""How the services talk: an experience queue (actors -> learner) and a weight store (learner ->
actors). `base.py` holds the contracts; each backend is one file (`redis.py`). docs/protocol.md
describes the wire format and the key layout."""
