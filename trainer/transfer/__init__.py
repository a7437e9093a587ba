"""transfer=auto's parts that run no training: its candidates, the training-free candidates and the selection with
its reports. The driver that trains the candidates is trainer/training/transfer_auto.py."""
