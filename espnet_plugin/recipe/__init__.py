"""Python steps of the recipe engine (egs2/TEMPLATE/asr1/asr.sh calls them)."""
