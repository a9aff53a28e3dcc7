"""The papers' methods, one module each: ``reskd``, ``lrmil``, ``ahdmil``."""
