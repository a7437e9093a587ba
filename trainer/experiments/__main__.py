from transrec.trainer.experiments.runner import main

main()
