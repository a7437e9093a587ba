"""TransRec trainer: model, two-stage DeepSpeed training, evaluation, transfer experiments."""
