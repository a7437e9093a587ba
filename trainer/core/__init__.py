"""The model and its configuration: typed config and presets, the modality registry and towers, the TransRec model,
its losses, checkpoints and exports, the frozen-block feature cache and process set-up. Imports nothing else of the
trainer."""
