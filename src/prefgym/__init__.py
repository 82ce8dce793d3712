"""prefgym: a gym for learning from preference feedback (the AlpacaFarm loop, anywhere)."""

__version__ = "0.1.0"

from prefgym.errors import ConfigError, DataError, PrefgymError  # noqa: E402

__all__ = ["PrefgymError", "DataError", "ConfigError", "__version__"]
