"""The desktop host: koi-tray in the system tray, on Qt and qasync.

Modules, from the entry point down:

- `app`: `run_tray(config, backend)`, the order of start-up and the exit codes.
- `controller`: one node driving a tray backend, the status window and the dialogs.
- `menu`: the pure snapshot → `MenuModel` function every backend renders.
- `backend`, `qt_tray`, `pystray_tray`: the tray interface and its two implementations.
- `status_window`: the same lines and actions in a window, where there is no tray.
- `approval`, `dialogs`: the approval decider and dialogs, opened without blocking.
- `icons`: Pillow-drawn icons; `logs`: the rotated log file.
"""
