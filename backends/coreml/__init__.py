"""Core ML target (ML Program ``.mlpackage``), validated on Linux by a NumPy MIL interpreter."""
