"""The serving layer: recommendations from an export on any catalogue.

`recommender.py` (Recommender: the Python API; MicroBatcher), `batch.py` (many users, one JSON line each),
`item_index.py` (item vectors and a FAISS index written once and served from), `app.py` (the HTTP service) and
`limits.py` (what the service accepts from a caller). It imports the core (trainer/) and the data layer, never a
command; the commands `python -m transrec.trainer.commands.recommend|index|serve` are thin modules over it. This file
imports nothing.
"""
