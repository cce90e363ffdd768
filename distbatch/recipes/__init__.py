"""Large-batch recipes: lr schedules and scaling rules, optimizers (LARS, LAMB), AdaScale."""
