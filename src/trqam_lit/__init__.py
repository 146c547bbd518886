"""trqam-lit: fine-tune pretrained flow-matching policies with Trust Region Q-Adjoint Matching."""

__version__ = "0.1.0.dev0"
