"""kiln.py's room: the headless runner (:mod:`.runner`) and UI <-> API workflow conversion (:mod:`.workflow_format`).

Not nodes: nothing here is loaded by ComfyUI's custom-node loader for the graph. ``kiln.py`` boots ComfyUI as a
library, loads the package, then imports :mod:`.runner`, which runs the very nodes a graph uses.
"""
