"""mira's Flower ``ServerApp``: runs ``mira.federated.flower.server.run_server`` on the
``Grid`` Flower hands it. Imports are lazy so that ``flwr run`` validates it quickly."""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from mira.errors import MiraError
    from mira.federated.flower.server import run_server, say

    try:
        run_server(grid, context.run_config)
    except MiraError as e:
        say(f"error: {e}")
        raise
