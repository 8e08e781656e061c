"""The app's logger name. Under Flower's "flwr" logger, so the app's lines reach Flower's handlers
(the terminal, `flwr log`), while ``server.app.flower_logs`` can quiet Flower's own INFO lines."""

APP_LOGGER = "flwr.fedcifar_app"
