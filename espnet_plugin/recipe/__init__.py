"""Python steps of the recipe engine: ``egs2/TEMPLATE/asr1/asr.sh`` runs each as
``python -m espnet_plugin.recipe.<step>``.

Data preparation, formatting, tokenization, scoring, comparison and the report need no model:
they import none of ESPnet's task modules, so each step starts in well under a second.
"""
