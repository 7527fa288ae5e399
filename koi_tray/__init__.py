"""koi-tray: a certmesh node (CA or member) hosted in a system-tray icon."""

__version__ = "0.1.0"
