"""The model store: its on-disk layout and the metadata the export stage writes into it."""
