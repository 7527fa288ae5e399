"""Composition: building a node, approvals, renewal loop, status, ordered shutdown.

The tray, `koi-tray serve` and embedded Python hosts all build their node here, so they
run the same servers and background tasks by construction.
"""
