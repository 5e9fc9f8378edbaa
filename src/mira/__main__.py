from mira.cli import entrypoint

entrypoint()
