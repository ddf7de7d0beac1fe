"""Neural network modules: mixers, blocks, encoders, decoders."""
