"""Command-line entry points; each registers the plugin, then runs an ESPnet program."""
