from trainer.experiments.runner import main

main()
