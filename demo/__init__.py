"""The demo: the whole main job end to end on embedded defaults (``make demo``, ``pfstorer demo``).

It drives both halves of the platform (:mod:`pipelines` trains and registers, :mod:`serving`
serves), so it lives above both: neither imports it. :mod:`demo.run` does the work,
:mod:`demo.cli` registers the command without importing it.
"""
