"""Python steps of the recipe engine (egs2/TEMPLATE/asr1/asr.sh calls them).

A package of its own, beside espnet_plugin: importing espnet_plugin registers its classes into
ESPnet, which imports all of espnet2.tasks (seconds per process); data preparation, tokenization,
scoring and reports need none of that.
"""
