"""Constitutional AI as a service stack: critique, revision and AI preference labels."""

__version__ = "0.1.0"
