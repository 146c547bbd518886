"""The training plumbing: random streams, checkpoints (atomic writes), callbacks, the online phase, rollout
evaluation, rank gathering and the private Lightning state the package reads. Imports only the math layer; agents and
domains build on it."""
