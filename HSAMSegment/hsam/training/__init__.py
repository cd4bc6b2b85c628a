"""Few-shot fine-tuning: the recipe, its data, loss and augmentation, cohorts and continued models."""
