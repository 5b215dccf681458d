"""The package version (its one home: ``sensimix.__version__`` and the V&V environment record read it)."""

__version__ = "0.2.0"
