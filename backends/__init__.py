"""Target backends. Each module here is one plugin, registered through the entry-point group
``mtconvert.backends`` (built-ins too), and imported only when first used."""
