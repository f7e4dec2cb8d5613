"""Zalando: nightly batch scoring of Fashion-MNIST articles into five groups.

The library never imports Prefect; flows/ and tasks/ orchestrate it.
"""

__version__ = "0.1.0"
