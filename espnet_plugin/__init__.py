"""ESPnet2 plugin: importing it registers the plugin's encoders, decoders and models into ESPnet's
class choices (into the task modules as soon as ESPnet imports them)."""

from espnet_plugin.registry import register

register()


def __getattr__(name):
    """``espnet_plugin.Transcriber``, imported when first used (it needs ESPnet's models)."""
    if name == "Transcriber":
        from espnet_plugin.transcribe import Transcriber

        return Transcriber
    raise AttributeError(f"module 'espnet_plugin' has no attribute {name!r}")
