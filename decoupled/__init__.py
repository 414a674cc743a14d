"""decoupled: asynchronous training with decoupled neural interfaces."""

__version__ = "0.1.0"
