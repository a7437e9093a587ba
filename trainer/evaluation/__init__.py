"""Ranking and metrics as a library: the evaluated users, a model's or an export's ranks over a whole catalogue, how
an export scores (user vector, prior), paired statistics and run comparison, collapse diagnostics."""
