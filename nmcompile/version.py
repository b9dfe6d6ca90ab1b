"""The package's version, in a module of its own so that modules inside nmcompile need not import the
package ``nmcompile`` above them to read it (``nmcompile.__version__`` re-exports it)."""
__version__ = "0.1.0"
