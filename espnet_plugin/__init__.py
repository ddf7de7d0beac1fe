"""ESPnet2 plugin: importing it registers the plugin's encoders, decoders and models into ESPnet's
class choices (into the task modules as soon as ESPnet imports them)."""

from espnet_plugin.registry import register

register()
