"""dapc: the domain-adaptive pretraining compiler. A recipe compiles to a plan; the plan is all the runtime reads."""

__version__ = "0.1.0"
__all__ = ["__version__"]
