"""Scoring: final answers (`answers`), best-of-N metrics (`metrics`), process reward models (`prm`).

Kept import-free so `import harness_ext.scoring.answers` does not pull in torch or transformers.
"""
