"""ESPnet2 plugin: importing it registers the plugin's encoders, decoders and models."""

from espnet_plugin.registry import register

register()
