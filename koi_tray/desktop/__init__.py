"""Desktop host: tray backends, icons, menu, dialogs."""
