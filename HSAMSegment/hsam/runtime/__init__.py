"""The process the engine runs in: its version, errors, CPU and GPU choice, progress events, the worker's watchdog."""
