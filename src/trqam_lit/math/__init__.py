"""The math layer: the paper's equations as small pure torch functions (networks, flow, SDE, adjoint, dual, critic
targets). No Lightning, no other layer: docs/method.md maps each equation to its function here."""
