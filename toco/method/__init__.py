"""ToCo's numerics: CAMs, PAR, losses and loss terms, crops, the step state, inference, metrics."""
