"""The doors: each adapts one server's transport to the serving loop (handler.serving)."""
