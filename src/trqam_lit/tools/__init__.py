"""Tools around training runs: the experiment runner and its report, the closed-form verifier and policy export.
They may import every layer below them; nothing in the package imports them except the CLI."""
