"""tokenprune's built-in stage plugins (installed as ``tokenprune_plugins``).

Each module is an ordinary plugin: it uses only the public :data:`tokenprune.hookimpl` and is
declared in the ``tokenprune`` entry-point group of tokenprune's ``pyproject.toml``, exactly as a
third-party package would be.
"""
