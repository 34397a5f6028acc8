"""The measurement harness: the testbed model and its evaluations, the benchmarks, the demo, the
router's development-set tools and the lmms-eval model. It sits on top of the library and the core
never imports it (a test checks the import graph); its commands join the ``tokenprune`` command
line through the ``register_commands`` hook (:mod:`tokenprune_lab.cli`), as a third party's would.
"""
