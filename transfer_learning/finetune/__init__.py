"""params `finetune` (stage finetune): LP-FT data, model, loop, files and the run."""
